"""CheckSupport: refuses (naming node and op) every graph the converter cannot map faithfully,
accepts the rest, and never changes the model."""
import numpy as np
import pytest
from helpers import run_ort
from onnx import helper
from onnx_builder import GraphBuilder

from onnx_snn.errors import ModelWeightsError, UnsupportedOpError
from onnx_snn.passes.check_support import CheckSupport
from onnx_snn.record import ConversionRecord


def supported_cnn():
    """Conv, Clip(0, 6), MaxPool, BN, shape arithmetic on activations, Concat, AveragePool, Gemm,
    and an unsupported op (Sigmoid) that only touches constants."""
    b = GraphBuilder()
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(4, 2, 3, 3), b.rand(4)], pads=[1, 1, 1, 1])])
    h = b.op("Clip", [b.bn(h, 4), b.const(np.float32(0)), b.const(np.float32(6))])
    h = b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("Concat", [h, b.op("AveragePool", [h], kernel_shape=[1, 1])], axis=1)
    shape = b.op("Concat", [b.op("Shape", [h], end=1), b.const(np.array([-1], np.int64))], axis=0)
    flat = b.op("Reshape", [h, shape])
    w = b.op("Sigmoid", [b.rand(8 * 3 * 3, 3)])  # not an activation: the same at every step
    y = b.op("Gemm", [flat, w, b.rand(3)])
    return b.model({"x": ["N", 2, 6, 6]}, [y])


def test_supported_graph_passes_through_untouched():
    model = supported_cnn()
    original = model.SerializeToString()
    record = ConversionRecord(dropped_softmax=["s"])
    result = CheckSupport()(model, record)
    assert result.modified is False
    assert result.model.SerializeToString() == original
    assert result.record == record and result.record is not record
    x = np.random.default_rng(0).standard_normal((2, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(result.model, {"x": x})[0], run_ort(model, {"x": x})[0])
    CheckSupport().ensures(result.model, result.record)


def test_unsorted_graph_is_checked_without_change():
    model = supported_cnn()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    original = model.SerializeToString()
    result = CheckSupport()(model)
    assert result.model.SerializeToString() == original and result.modified is False


def _refused(build):
    b = GraphBuilder()
    y, culprit_op = build(b)
    model = b.model({"x": ["N", 4]}, [y])
    culprit = next(n for n in model.graph.node if n.op_type == culprit_op)
    return model, culprit


CASES = {
    "unsupported_op": (lambda b: (b.op("Sigmoid", [b.op("Gemm", ["x", b.rand(4, 4)])]), "Sigmoid"),
                       "has no SNN equivalent"),
    "hidden_softmax": (lambda b: (b.op("Gemm", [b.op("Softmax", ["x"]), b.rand(4, 2)]), "Softmax"),
                       "only supported directly before a graph output"),
    "gemm_weights_from_input": (lambda b: (b.op("Gemm", ["x", b.op("Reshape", ["x", b.const(np.array([4, -1]))])]),
                                           "Gemm"), "weights or bias computed from the input"),
    "matmul_of_activations": (lambda b: (b.op("MatMul", [b.op("Relu", ["x"]), b.op("Transpose", ["x"])]), "MatMul"),
                              "multiplies two activations"),
    "mul_of_activations": (lambda b: (b.op("Mul", ["x", b.op("Relu", ["x"])]), "Mul"), "multiplies two activations"),
    "div_by_activation": (lambda b: (b.op("Div", [b.rand(4), "x"]), "Div"), "divides by an activation"),
    "clip_min_not_zero": (lambda b: (b.op("Clip", ["x", b.const(np.float32(-1)), b.const(np.float32(1))]), "Clip"),
                          "has min -1.0"),
    "clip_without_min": (lambda b: (b.op("Clip", ["x", "", b.const(np.float32(1))]), "Clip"), "has min None"),
    "clip_max_not_positive": (lambda b: (b.op("Clip", ["x", b.const(np.float32(0)), b.const(np.float32(0))]), "Clip"),
                              "never activates"),
    "clip_bound_from_input": (lambda b: (b.op("Clip", ["x", b.const(np.float32(0)),
                                                       b.op("ReduceMean", ["x"], keepdims=0)]), "Clip"),
                              "non-constant max bound"),
    "maxpool_indices_used": (lambda b: (b.op("Add", b.op("MaxPool", [b.op("Unsqueeze", ["x", b.const(np.array([2]))])],
                                                        outputs=2, kernel_shape=[1])), "MaxPool"),
                             "second output"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unfaithful_graph_is_refused_naming_node_and_op(case):
    build, message = CASES[case]
    model, culprit = _refused(build)
    original = model.SerializeToString()
    with pytest.raises(UnsupportedOpError, match=message) as info:
        CheckSupport()(model)
    assert (info.value.node_name, info.value.op_type) == (culprit.name, culprit.op_type)
    assert model.SerializeToString() == original


def test_custom_domain_op_is_refused():
    b = GraphBuilder()
    model = b.model({"x": ["N", 4]}, [b.op("Relu", ["x"])])
    model.graph.node.append(helper.make_node("Swish", [model.graph.output[0].name], ["z"], name="sw", domain="my.ops"))
    model.graph.output[0].name = "z"
    with pytest.raises(UnsupportedOpError, match="custom domain") as info:
        CheckSupport()(model)
    assert (info.value.node_name, info.value.op_type) == ("sw", "my.ops.Swish")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused(bad):
    b = GraphBuilder()
    w = np.ones((4, 3), np.float32)
    w[1, 2] = bad
    gemm = b.op("Gemm", ["x", b.const(w)])
    model = b.model({"x": ["N", 4]}, [gemm])
    with pytest.raises(ModelWeightsError, match="1 NaN or Inf value"):
        CheckSupport()(model)


def test_infinite_clip_bound_is_fine_but_nan_is_not():
    b = GraphBuilder()
    y = b.op("Clip", ["x", b.const(np.float32(0)), b.const(np.float32(np.inf))])
    model = b.model({"x": ["N", 4]}, [y])
    assert CheckSupport()(model).modified is False
    model.graph.initializer[1].CopyFrom(helper.make_tensor(model.graph.initializer[1].name, 1, [], [np.nan]))
    with pytest.raises(ModelWeightsError):
        CheckSupport()(model)
