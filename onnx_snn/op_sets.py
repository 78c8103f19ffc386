"""The operator sets the converter knows (no imports: ``errors`` and ``support`` both read them)."""

NEURON_OPS = {"Relu", "Clip"}
LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Sum", "Neg",
              "BatchNormalization", "AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceSum",
              "Concat", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Pad", "Slice",
              "Split", "Identity", "Dropout"}
MAX_OPS = {"MaxPool", "GlobalMaxPool"}
OUTPUT_ONLY_OPS = {"Softmax", "LogSoftmax"}
SHAPE_OPS = {"Shape", "Size"}  # read an activation's shape only
SUPPORTED_OPS = NEURON_OPS | LINEAR_OPS | MAX_OPS | OUTPUT_ONLY_OPS | SHAPE_OPS
