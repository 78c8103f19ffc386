"""Canonicalize: constants become initializers and fold, Identity/Dropout go, names become unique,
nodes get sorted, old opsets are upgraded; the function the model computes is unchanged."""
import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx import helper, numpy_helper
from onnx_builder import GraphBuilder

from onnx_snn.errors import ModelLoadError
from onnx_snn.passes.base import ContractError, PassManager
from onnx_snn.passes.canonicalize import Canonicalize, default_opset, max_onnx_opset

RTOL, ATOL = 1e-5, 1e-6


def ops(model):
    return [n.op_type for n in model.graph.node]


def feeds_for(model, batch=3, seed=7):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def assert_same_function(a, b, batch=3):
    feeds = feeds_for(a, batch)
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    for x, y in zip(run_ort(a, feeds), run_ort(b, feeds)):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


def messy_model():
    """Gemm -> Identity -> Relu -> Dropout -> Mul(Constant node) -> Add(folded Add of two constants)."""
    b = GraphBuilder()
    h = b.op("Gemm", ["x", b.rand(5, 4), b.rand(4)], transB=0)
    h = b.op("Relu", [b.op("Identity", [h])])
    h = b.op("Dropout", [h])
    scale = b.op("Constant", [], value=numpy_helper.from_array(np.full((4,), 1.5, np.float32)))
    shift = b.op("Add", [b.rand(4), b.rand(4)])  # inputs all constant: folded
    y = b.op("Add", [b.op("Mul", [h, scale]), shift])
    return b.model({"x": ["N", 5]}, [y])


def test_messy_model_is_canonical_and_computes_the_same():
    model = messy_model()
    result = Canonicalize()(model)
    out = result.model
    assert result.modified is True
    assert ops(out) == ["Gemm", "Relu", "Mul", "Add"], ops(out)
    kept = {n.name for n in model.graph.node if n.op_type in ("Gemm", "Relu", "Mul")}
    assert kept <= {n.name for n in out.graph.node}  # surviving nodes keep their names
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    const_out = next(n.output[0] for n in model.graph.node if n.op_type == "Constant")
    np.testing.assert_array_equal(inits[const_out], np.full((4,), 1.5, np.float32))  # Constant -> initializer
    fold_node = next(n for n in model.graph.node if n.op_type == "Add" and n.input[0].startswith("c"))
    a, b = (numpy_helper.to_array(t) for t in model.graph.initializer if t.name in fold_node.input)
    np.testing.assert_allclose(inits[fold_node.output[0]], a + b, rtol=RTOL, atol=ATOL)  # folded Add
    assert [i.name for i in out.graph.input] == ["x"]
    assert out.graph.output[0].name == model.graph.output[0].name
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"  # dynamic batch kept
    assert {v.name for v in out.graph.value_info} >= {n.output[0] for n in out.graph.node[:-1]}  # shapes inferred
    assert result.record == type(result.record)()  # nothing recorded, nothing else touched
    assert_same_function(out, model)
    Canonicalize().ensures(out, result.record)


def test_static_shape_computation_folds_away():
    """Reshape(x, Concat(Shape(x)[0:1], [-1])) with a static x: only the Reshape is left."""
    b = GraphBuilder()
    shape = b.op("Concat", [b.op("Shape", ["x"], end=1), b.const(np.array([-1], np.int64))], axis=0)
    y = b.op("Relu", [b.op("Reshape", ["x", shape])])
    model = b.model({"x": [2, 3, 4]}, [y])
    out = Canonicalize()(model).model
    assert ops(out) == ["Reshape", "Relu"], ops(out)
    reshape = out.graph.node[0]
    target = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}[reshape.input[1]]
    np.testing.assert_array_equal(target, [2, -1])
    assert_same_function(out, model)


def test_shape_of_dynamic_batch_is_kept():
    b = GraphBuilder()
    shape = b.op("Concat", [b.op("Shape", ["x"], end=1), b.const(np.array([-1], np.int64))], axis=0)
    y = b.op("Reshape", ["x", shape])
    model = b.model({"x": ["N", 3, 4]}, [y])
    out = Canonicalize()(model).model
    assert "Shape" in ops(out)  # the batch size is only known at run time
    assert_same_function(out, model, batch=5)


def test_empty_names_filled_and_nodes_sorted():
    b = GraphBuilder()
    h = b.op("Relu", [b.op("Gemm", ["x", b.rand(5, 4)])])
    y = b.op("Neg", [b.op("Sigmoid", [h])])
    model = b.model({"x": ["N", 5]}, [y])
    names = [n.name for n in model.graph.node]
    model.graph.node[1].name = ""
    model.graph.node[2].name = ""
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # onnxruntime runs it; the passes need it sorted
    out = Canonicalize()(model).model
    out_names = [n.name for n in out.graph.node]
    assert ops(out) == ["Gemm", "Relu", "Sigmoid", "Neg"]
    assert "" not in out_names and len(set(out_names)) == 4
    assert out_names[0] == names[0] and out_names[3] == names[3]  # names that were fine are kept
    Canonicalize().ensures(out, None)
    assert_same_function(out, model)


def test_duplicate_node_names_are_refused_with_the_reason():
    b = GraphBuilder()
    model = b.model({"x": ["N", 5]}, [b.op("Neg", [b.op("Relu", ["x"])])])
    model.graph.node[1].name = model.graph.node[0].name
    with pytest.raises(ModelLoadError, match="same node name"):
        Canonicalize()(model)


def test_old_opset_is_upgraded():
    b = GraphBuilder(opset=13)
    y = b.op("Relu", [b.op("Conv", ["x", b.rand(3, 2, 3, 3), b.rand(3)], pads=[1, 1, 1, 1])])
    model = b.model({"x": ["N", 2, 5, 5]}, [y])
    out = Canonicalize()(model).model
    assert default_opset(out) == 15
    assert default_opset(model) == 13
    Canonicalize().ensures(out, None)
    assert_same_function(out, model)


def test_canonical_model_is_unchanged():
    first = Canonicalize()(messy_model()).model
    second = Canonicalize()(first)
    assert second.model.graph == first.graph
    assert second.model.opset_import == first.opset_import


def test_canonical_model_reports_unmodified():
    first = Canonicalize()(messy_model()).model
    assert Canonicalize()(first).modified is False


@pytest.mark.parametrize("source", ["graph_input", "graph_output"])
def test_identity_between_interface_tensors_stays(source):
    """An Identity copying a graph input or output to another output keeps both interface names
    (torch's `return y, y`): it stays, the guarantee allows it, and the values are unchanged."""
    b = GraphBuilder()
    y = b.op("Relu", ["x"])
    copy = b.op("Identity", ["x" if source == "graph_input" else y])
    model = b.model({"x": ["N", 5]}, [y, copy])
    result = PassManager([Canonicalize()], check=True)(model)
    assert ops(result.model).count("Identity") == 1
    assert [o.name for o in result.model.graph.output] == [y, copy]
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    for got, want in zip(run_ort(result.model, {"x": x}), run_ort(model, {"x": x})):
        np.testing.assert_array_equal(got, want)


def test_model_with_neurons_is_refused():
    b = GraphBuilder()
    y = b.op("Relu", ["x"])
    model = b.model({"x": ["N", 5]}, [y])
    model.graph.node.append(helper.make_node("IFNeuron", [y], ["z"], name="n", domain="onnx_snn"))
    with pytest.raises(ModelLoadError, match="already contains onnx_snn neurons"):
        Canonicalize()(model)


def test_model_without_inputs_is_refused():
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1])],
                              [numpy_helper.from_array(np.ones(1, np.float32), "c")])
    with pytest.raises(ModelLoadError, match="no graph inputs"):
        Canonicalize()(helper.make_model(graph))


def test_too_new_opset_is_refused():
    b = GraphBuilder()
    model = b.model({"x": ["N", 5]}, [b.op("Relu", ["x"])])
    model.opset_import[0].version = max_onnx_opset() + 1
    with pytest.raises(ModelLoadError, match="newer than onnx-snn runs"):
        Canonicalize()(model)


@pytest.mark.parametrize("breakage", ["identity", "constant", "duplicate_name", "empty_name", "unsorted", "opset"])
def test_ensures_catches_a_non_canonical_model(breakage):
    b = GraphBuilder(opset=13 if breakage == "opset" else 17)
    h = b.op("Relu", ["x"])
    if breakage == "identity":
        h = b.op("Identity", [h])
    if breakage == "constant":
        h = b.op("Mul", [h, b.op("Constant", [], value=numpy_helper.from_array(np.ones(1, np.float32)))])
    y = b.op("Neg", [h])
    model = b.model({"x": ["N", 5]}, [y])
    if breakage == "duplicate_name":
        model.graph.node[1].name = model.graph.node[0].name
    elif breakage == "empty_name":
        model.graph.node[0].name = ""
    elif breakage == "unsorted":
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(reversed(nodes))
    with pytest.raises(ContractError):
        Canonicalize().ensures(model, None)
    if breakage != "duplicate_name":  # (onnxruntime refuses that one: see above)
        Canonicalize().ensures(Canonicalize()(model).model, None)  # the pass repairs each of them
