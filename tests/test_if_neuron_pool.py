"""The fused neuron + AveragePool ops equal their numpy references in every form: function
body (stock onnxruntime), ``onnx.reference`` op and native kernel, bit for bit."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from test_if_neuron_seq import ATTRS, assert_same, session

from onnx_snn.ops import if_neuron, if_neuron_pool, if_neuron_seq
from onnx_snn.ops.if_neuron_pool import SEQ_CONST_POOL, SEQ_POOL

OPS = (SEQ_POOL, SEQ_CONST_POOL)


def pool_model(op, kernel, dtype=np.float32, chw=(3, 6, 7), **attrs):
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = ["x", "v"] + (["steps"] if op == SEQ_CONST_POOL else [])
    node = helper.make_node(op, inputs, ["p", "v_next", "count"], domain=if_neuron.DOMAIN, kernel_shape=kernel, **attrs)
    io = [helper.make_tensor_value_info("x", t, ["KN" if op == SEQ_POOL else "N", *chw]),
          helper.make_tensor_value_info("v", t, ["N", *chw])]
    if op == SEQ_CONST_POOL:
        io.append(helper.make_tensor_value_info("steps", TensorProto.INT64, ["K"]))
    pooled = [chw[0], chw[1] // kernel[0], chw[2] // kernel[1]]
    outs = [helper.make_tensor_value_info("p", t, ["KN", *pooled]), helper.make_tensor_value_info("v_next", t, ["N", *chw]),
            helper.make_tensor_value_info("count", t, ["KN"])]
    mode = if_neuron.RESET_MODES[attrs.get("reset_mode", 0)]
    functions = [if_neuron_seq.make_function(if_neuron_pool.UNFUSED[op], 17, [mode]), if_neuron_pool.make_function(op, 17)]
    model = helper.make_model(helper.make_graph([node], op, io, outs),
                              opset_imports=[helper.make_opsetid("", 17)] + if_neuron.opset_imports(), functions=functions)
    model.ir_version = 9
    return model


def feeds_for(op, n, k, dtype=np.float32, chw=(3, 6, 7), seed=0):
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.uniform(-0.6, 1.4, ((k * n) if op == SEQ_POOL else n, *chw)).astype(dtype),
             "v": rng.uniform(-0.5, 1.0, (n, *chw)).astype(dtype)}
    if op == SEQ_CONST_POOL:
        feeds["steps"] = np.arange(k, dtype=np.int64)
    return feeds


def reference(op, feeds, kernel, **attrs):
    if op == SEQ_POOL:
        return if_neuron_pool.if_seq_pool(feeds["x"], feeds["v"], kernel, **attrs)
    return if_neuron_pool.if_seq_const_pool(feeds["x"], feeds["v"], feeds["steps"], kernel, **attrs)


@pytest.mark.parametrize("op", OPS)
def test_models_with_the_ops_pass_full_check(op):
    onnx.checker.check_model(pool_model(op, [2, 2]), full_check=True)


@pytest.mark.parametrize("kernel", [[2, 2], [3, 3], [2, 3]])
@pytest.mark.parametrize("attrs", ATTRS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_function_body_and_onnx_reference_equal_numpy(op, attrs, kernel, dtype):
    model = pool_model(op, kernel, dtype, **attrs)
    for n, k in ((1, 1), (2, 5)):
        feeds = feeds_for(op, n, k, dtype)
        want = reference(op, feeds, kernel, **attrs)
        assert 0 < want[2].sum() < want[2].size * 3 * 6 * 7
        if dtype == np.float32:  # onnxruntime's CPU AveragePool has no double kernel
            assert_same(session(model).run(None, feeds), want)
        assert_same(ReferenceEvaluator(model, new_ops=if_neuron_pool.REFERENCE_OPS).run(None, feeds), want)


def test_pooled_reference_is_the_sequence_then_the_pool():
    feeds = feeds_for(SEQ_POOL, 2, 3)
    s, v = if_neuron_seq.if_seq(feeds["x"], feeds["v"])
    p, v2, count = if_neuron_pool.if_seq_pool(feeds["x"], feeds["v"], [2, 2])
    np.testing.assert_array_equal(v, v2)
    np.testing.assert_array_equal(count, s.sum(axis=(1, 2, 3)))
    np.testing.assert_array_equal(p[0, 0, 0, 0], s[0, 0, :2, :2].mean())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kernel", [[2, 2], [3, 3], [2, 3]])
@pytest.mark.parametrize("attrs", ATTRS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_native_kernel_equals_numpy(native_kernels, op, attrs, kernel, dtype, threads):
    model = pool_model(op, kernel, dtype, chw=(4, 9, 11), **attrs)
    native = session(model, native_kernels, threads)
    for n, k in ((0, 3), (1, 1), (5, 3), (70, 4)):
        feeds = feeds_for(op, n, k, dtype, chw=(4, 9, 11))
        assert_same(native.run(None, feeds), reference(op, feeds, kernel, **attrs))


def test_fusable_names_what_stops_a_fusion():
    assert if_neuron_pool.fusable({"kernel_shape": [2, 2], "strides": [2, 2]}) is None
    assert "stride" in if_neuron_pool.fusable({"kernel_shape": [2, 2]})
    assert "pads" in if_neuron_pool.fusable({"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1]})
    assert "2-D" in if_neuron_pool.fusable({"kernel_shape": [2], "strides": [2]})
    with pytest.raises(ValueError, match="unknown"):
        if_neuron_pool.make_function("IFNeuronSeqMaxPool", 17)
