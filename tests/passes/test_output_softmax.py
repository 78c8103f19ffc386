"""DropOutputSoftmax: a Softmax/LogSoftmax producing a graph output is removed, the output keeps
its name and now holds the logits; any other Softmax is left alone."""
import numpy as np
import pytest
from helpers import run_ort
from onnx_builder import GraphBuilder

from onnx_snn.passes.base import ContractError, PassManager
from onnx_snn.passes.output_softmax import DropOutputSoftmax
from onnx_snn.record import ConversionRecord

RTOL, ATOL = 1e-5, 1e-6
X = np.random.default_rng(3).standard_normal((4, 5)).astype(np.float32)


def ops(model):
    return [n.op_type for n in model.graph.node]


def softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def classifier(op="Softmax"):
    b = GraphBuilder()
    logits = b.op("Gemm", [b.op("Relu", [b.op("Gemm", ["x", b.rand(5, 6), b.rand(6)])]), b.rand(6, 3), b.rand(3)])
    y = b.op(op, [logits])
    return b.model({"x": ["N", 5]}, [y]), logits


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_output_softmax_is_dropped(op):
    model, _ = classifier(op)
    node = model.graph.node[-1]
    result = DropOutputSoftmax()(model)
    out = result.model
    assert result.modified is True
    assert ops(out) == ["Gemm", "Relu", "Gemm"]
    assert result.record.dropped_softmax == [node.name]
    assert [o.name for o in out.graph.output] == [node.output[0]]  # the name the user reads stays
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    # numbers: the output is now the logits; the original is their (log)softmax
    got, = run_ort(out, {"x": X})
    want, = run_ort(model, {"x": X})
    expect = np.log(softmax(got)) if op == "LogSoftmax" else softmax(got)
    np.testing.assert_allclose(expect, want, rtol=RTOL, atol=ATOL)
    assert not np.allclose(got, want)  # it really is a different tensor now
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    DropOutputSoftmax().ensures(out, result.record)


def test_record_is_extended_not_replaced_and_input_record_untouched():
    model, _ = classifier()
    before = ConversionRecord(dropped_softmax=["earlier"])
    result = DropOutputSoftmax()(model, before)
    assert result.record.dropped_softmax == ["earlier", model.graph.node[-1].name]
    assert before.dropped_softmax == ["earlier"]


def test_two_outputs_each_lose_their_softmax():
    b = GraphBuilder()
    h = b.op("Relu", [b.op("Gemm", ["x", b.rand(5, 6)])])
    y1 = b.op("Softmax", [b.op("Gemm", [h, b.rand(6, 3)])])
    y2 = b.op("LogSoftmax", [b.op("Gemm", [h, b.rand(6, 2)])])
    model = b.model({"x": ["N", 5]}, [y1, y2])
    names = [n.name for n in model.graph.node if n.op_type.endswith("Softmax")]
    result = DropOutputSoftmax()(model)
    assert "Softmax" not in ops(result.model) and "LogSoftmax" not in ops(result.model)
    assert sorted(result.record.dropped_softmax) == sorted(names)
    assert [o.name for o in result.model.graph.output] == [y1, y2]
    got1, got2 = run_ort(result.model, {"x": X})
    want1, want2 = run_ort(model, {"x": X})
    np.testing.assert_allclose(softmax(got1), want1, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.log(softmax(got2)), want2, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("where", ["hidden", "output_also_read", "no_softmax"])
def test_other_graphs_are_unchanged(where):
    b = GraphBuilder()
    z = b.op("Gemm", ["x", b.rand(5, 3)])
    if where == "hidden":  # Softmax inside the network: the support check refuses it, not this pass
        y = b.op("Gemm", [b.op("Softmax", [z]), b.rand(3, 2)])
        outputs = [y]
    elif where == "output_also_read":  # the softmax output is also read inside the graph
        p = b.op("Softmax", [z])
        outputs = [p, b.op("Neg", [p])]
    else:
        outputs = [b.op("Relu", [z])]
    model = b.model({"x": ["N", 5]}, outputs)
    original = model.SerializeToString()
    result = DropOutputSoftmax()(model)
    assert result.modified is False
    assert result.model.SerializeToString() == original
    assert result.record.dropped_softmax == []
    DropOutputSoftmax().ensures(result.model, result.record)


def test_ensures_catches_an_output_softmax():
    model, _ = classifier()
    with pytest.raises(ContractError, match="still produces output"):
        DropOutputSoftmax().ensures(model, ConversionRecord())


def test_softmax_of_another_output_is_dropped():
    b = GraphBuilder()
    z = b.op("Gemm", ["x", b.rand(5, 3)])
    model = b.model({"x": ["N", 5]}, [z, b.op("Softmax", [z])])
    result = PassManager([DropOutputSoftmax()], check=True)(model)
    assert "Softmax" not in ops(result.model)
