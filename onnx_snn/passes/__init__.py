"""Graph passes, each a module with one entry point; ``onnx_snn.converter.pipeline`` lists them in order."""
