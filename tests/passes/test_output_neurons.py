"""AddOutputNeurons (spike-count readout): every graph output becomes relu of what it was, under
the same name; nodes that read an output inside the graph still see the value before the ReLU."""
import numpy as np
import pytest
from helpers import run_ort
from onnx import TensorProto, helper
from onnx_builder import GraphBuilder

from onnx_snn.passes.base import ContractError
from onnx_snn.passes.output_neurons import AddOutputNeurons
from onnx_snn.record import ConversionRecord

RTOL, ATOL = 1e-5, 1e-6
X = np.random.default_rng(5).standard_normal((6, 5)).astype(np.float32)


def ops(model):
    return [n.op_type for n in model.graph.node]


def classifier():
    b = GraphBuilder()
    y = b.op("Gemm", [b.op("Relu", [b.op("Gemm", ["x", b.rand(5, 8), b.rand(8)])]), b.rand(8, 4), b.rand(4)])
    return b.model({"x": ["N", 5]}, [y])


def test_output_becomes_relu_of_the_logits():
    model = classifier()
    result = AddOutputNeurons()(model)
    out = result.model
    assert result.modified is True
    assert ops(out) == ["Gemm", "Relu", "Gemm", "Relu"]
    assert [n.name for n in out.graph.node[:3]] == [n.name for n in model.graph.node]
    readout = out.graph.node[-1]
    assert readout.output[0] == model.graph.output[0].name == out.graph.output[0].name
    assert readout.input[0] == out.graph.node[2].output[0] != readout.output[0]
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    got, = run_ort(out, {"x": X})
    want, = run_ort(model, {"x": X})
    assert (want < 0).any() and (want > 0).any()  # the test sees both signs
    np.testing.assert_allclose(got, np.maximum(want, 0), rtol=RTOL, atol=ATOL)
    assert result.record == ConversionRecord()
    AddOutputNeurons().ensures(out, result.record)


def test_every_output_gets_its_neuron_and_inner_readers_keep_the_raw_value():
    """Outputs h (also read by the next layer) and y: both become ReLUs; the next layer still reads h."""
    b = GraphBuilder()
    h = b.op("Gemm", ["x", b.rand(5, 8)])
    y = b.op("Gemm", [h, b.rand(8, 3)])
    model = b.model({"x": ["N", 5]}, [h, y])
    out = AddOutputNeurons()(model).model
    assert ops(out).count("Relu") == 2 and ops(out).count("Gemm") == 2
    assert [o.name for o in out.graph.output] == [h, y]
    got_h, got_y = run_ort(out, {"x": X})
    want_h, want_y = run_ort(model, {"x": X})
    np.testing.assert_allclose(got_h, np.maximum(want_h, 0), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_y, np.maximum(want_y, 0), rtol=RTOL, atol=ATOL)
    assert (want_h < 0).any()  # so an inner reader fed the ReLU'd h would compute a different y
    AddOutputNeurons().ensures(out, None)


def test_one_output_of_a_multi_output_node():
    b = GraphBuilder()
    first, second = b.op("Split", [b.op("Gemm", ["x", b.rand(5, 6)]), b.const(np.array([2, 4]))], outputs=2, axis=1)
    model = b.model({"x": ["N", 5]}, [first, b.op("Neg", [second])])
    out = AddOutputNeurons()(model).model
    got = run_ort(out, {"x": X})
    want = run_ort(model, {"x": X})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, np.maximum(w, 0), rtol=RTOL, atol=ATOL)
    assert [o.name for o in out.graph.output] == [first, model.graph.output[1].name]
    assert ops(out).count("Relu") == 2 and "Split" in ops(out)


def test_input_passed_through_is_left_alone():
    b = GraphBuilder()
    model = b.model({"x": ["N", 5]}, [b.op("Neg", ["x"])])
    model.graph.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5]))
    out = AddOutputNeurons()(model).model
    assert ops(out) == ["Neg", "Relu"]
    neg_out, x_out = run_ort(out, {"x": X})
    np.testing.assert_array_equal(x_out, X)  # no readout on an input: nothing computes it
    np.testing.assert_allclose(neg_out, np.maximum(-X, 0), rtol=RTOL, atol=ATOL)
    AddOutputNeurons().ensures(out, None)


def _passthrough():
    info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])
    return helper.make_model(helper.make_graph([], "g", [info], [info]), opset_imports=[helper.make_opsetid("", 17)])


def test_graph_with_nothing_to_read_out_keeps_its_graph():
    model = _passthrough()
    result = AddOutputNeurons()(model)
    assert result.model.graph == model.graph
    AddOutputNeurons().ensures(result.model, result.record)


def test_graph_with_nothing_to_read_out_reports_unmodified():
    assert AddOutputNeurons()(_passthrough()).modified is False


def test_ensures_catches_an_output_without_neuron():
    with pytest.raises(ContractError, match="not a ReLU"):
        AddOutputNeurons().ensures(classifier(), ConversionRecord())
