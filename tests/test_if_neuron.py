"""The IFNeuron op: its ONNX function body (run by onnxruntime) equals its numpy reference."""
import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnx_snn.ops import if_neuron


def neuron_model(opset=17, dtype=TensorProto.FLOAT, body_modes=if_neuron.RESET_MODES, **attrs):
    node = helper.make_node(if_neuron.OP_TYPE, ["x", "v"], ["s", "v_next"], domain=if_neuron.DOMAIN, **attrs)
    io = lambda n: helper.make_tensor_value_info(n, dtype, ["N", 3, 5])  # noqa: E731
    graph = helper.make_graph([node], "if", [io("x"), io("v")], [io("s"), io("v_next")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] + if_neuron.opset_imports(),
                              functions=[if_neuron.make_function(opset, body_modes)])
    model.ir_version = 9
    return model


def numpy_if(x, v, threshold, reset_mode, v_reset):
    """Independent restatement of the semantics (SpikingJelly IFNode) to test the reference against."""
    h = v + x
    s = (h >= threshold).astype(x.dtype)
    nxt = h - s * threshold if reset_mode == "subtract" else h * (1 - s) + s * v_reset
    return s, nxt


@pytest.mark.parametrize("opset", [15, 17, 18, 20])
def test_model_with_neuron_passes_full_check(opset):
    onnx.checker.check_model(neuron_model(opset), full_check=True)


@pytest.mark.parametrize("reset_mode,v_reset", [("subtract", 0.0), ("zero", 0.0), ("zero", -0.3)])
@pytest.mark.parametrize("threshold", [1.0, 0.37])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("body", ["general", "one mode"])
def test_function_body_equals_reference_over_many_steps(reset_mode, v_reset, threshold, dtype, body):
    attrs = if_neuron.attributes(threshold, reset_mode, v_reset)
    modes = if_neuron.RESET_MODES if body == "general" else [reset_mode]
    model = neuron_model(dtype=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), body_modes=modes, **attrs)
    reference = ReferenceEvaluator(model, new_ops=[if_neuron.IFNeuron])
    rng = np.random.default_rng(1)
    v_ort = v_ref = v_np = np.zeros((4, 3, 5), dtype)
    spikes = 0
    for _ in range(40):
        x = rng.uniform(-0.5, 1.5, (4, 3, 5)).astype(dtype)
        s_ort, v_ort = run_ort(model, {"x": x, "v": v_ort})
        s_ref, v_ref = reference.run(None, {"x": x, "v": v_ref})
        # attributes are float32 in ONNX, so the thresholds are float32 values whatever the tensor type
        s_np, v_np = numpy_if(x, v_np, dtype(np.float32(threshold)), reset_mode, dtype(np.float32(v_reset)))
        np.testing.assert_array_equal(s_ort, s_ref)  # spike-exact
        np.testing.assert_array_equal(s_ref, s_np)
        assert np.abs(v_ort - v_ref).max() <= 4 * np.finfo(dtype).eps * (1 + np.abs(v_ref).max())
        np.testing.assert_array_equal(v_ref, v_np)
        spikes += s_ort.sum()
    assert 0 < spikes < 40 * 60  # the test exercises both firing and silence


def test_threshold_crossing_is_inclusive_and_reset_subtracts():
    model = neuron_model()
    x = np.array([0.5, 1.0, 2.5, -1.0, 0.999], np.float32).reshape(1, 1, 5).repeat(3, 1)
    v = np.array([0.5, 0.0, 0.0, 0.0, 0.0], np.float32).reshape(1, 1, 5).repeat(3, 1)
    s, v_next = run_ort(model, {"x": x, "v": v})
    np.testing.assert_array_equal(s[0, 0], [1, 1, 1, 0, 0])
    np.testing.assert_allclose(v_next[0, 0], [0.0, 0.0, 1.5, -1.0, 0.999], atol=1e-7)


@pytest.mark.parametrize("body_modes,reset_mode", [(if_neuron.RESET_MODES, 2), (["subtract"], 1), (["zero"], 0)])
def test_reset_mode_the_body_lacks_poisons_instead_of_guessing(body_modes, reset_mode):
    model = neuron_model(body_modes=body_modes, reset_mode=reset_mode)
    x = np.ones((1, 3, 5), np.float32)
    _, v_next = run_ort(model, {"x": x, "v": np.zeros_like(x)})
    assert np.isnan(v_next).all()


def test_one_mode_body_leaves_the_other_reset_out():
    """The subtract-only body is what converted models run: no Where, two ops fewer than the general body."""
    ops = lambda fn: [node.op_type for node in fn.node if node.op_type != "Constant"]  # noqa: E731
    general, subtract = if_neuron.make_function(17), if_neuron.make_function(17, ["subtract"])
    assert "Where" in ops(general) and "Where" not in ops(subtract)
    assert len(ops(subtract)) < len(ops(general))


def test_unknown_reset_mode_is_refused_by_the_reference():
    model = neuron_model(reset_mode=2)
    x = np.ones((1, 3, 5), np.float32)
    with pytest.raises(ValueError, match="reset_mode"):
        ReferenceEvaluator(model, new_ops=[if_neuron.IFNeuron]).run(None, {"x": x, "v": np.zeros_like(x)})


def test_make_node_rejects_bad_attributes():
    with pytest.raises(ValueError, match="reset_mode"):
        if_neuron.make_node("x", "v", "s", "vn", "n", reset_mode="hard")
    with pytest.raises(ValueError, match="reset_mode"):
        if_neuron.make_node("x", "v", "s", "vn", "n", reset_mode=3)
    node = if_neuron.make_node("x", "v", "s", "vn", "n", reset_mode="zero")
    assert {a.name: a.i for a in node.attribute}["reset_mode"] == 1
    with pytest.raises(ValueError, match="threshold"):
        if_neuron.make_node("x", "v", "s", "vn", "n", threshold=0.0)
    with pytest.raises(ValueError, match="opset"):
        if_neuron.make_function(13)


def test_body_uses_only_standard_ops_a_gpu_provider_runs():
    """No string or ai.onnx.ml op in the body: onnxruntime would keep it on the CPU and refuse CUDA graphs."""
    fn = if_neuron.make_function(17)
    assert [o.domain for o in fn.opset_import] == [""]
    assert all(node.domain == "" for node in fn.node)


def test_schema_is_registered():
    schema = onnx.defs.get_schema(if_neuron.OP_TYPE, if_neuron.VERSION, if_neuron.DOMAIN)
    assert [i.name for i in schema.inputs] == ["X", "V"]
    assert set(schema.attributes) == {"threshold", "reset_mode", "v_reset"}
