"""Every form of the neuron ops equals the numpy reference: IFNeuron, IFNeuronSeq and
IFNeuronSeqConst, each as an ONNX function body (stock onnxruntime), as an ``onnx.reference``
op and as a native kernel (the library built from runtime/kernels/), bit for bit."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnx_snn.ops import if_neuron, if_neuron_seq
from onnx_snn.ops.if_neuron_seq import SEQ, SEQ_CONST

OPS = (if_neuron.OP_TYPE, SEQ, SEQ_CONST)


def op_model(op, dtype=np.float32, tail=(3, 5), body_modes=if_neuron.RESET_MODES, **attrs):
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = ["x", "v"] + (["steps"] if op == SEQ_CONST else [])
    outputs = ["s", "v_next"] + (["count"] if op != if_neuron.OP_TYPE else [])
    node = helper.make_node(op, inputs, outputs, domain=if_neuron.DOMAIN, **attrs)
    rows = "N" if op == if_neuron.OP_TYPE else "KN"
    io = [helper.make_tensor_value_info("x", t, ["N" if op != SEQ else "KN", *tail]),
          helper.make_tensor_value_info("v", t, ["N", *tail])]
    if op == SEQ_CONST:
        io.append(helper.make_tensor_value_info("steps", TensorProto.INT64, ["K"]))
    outs = [helper.make_tensor_value_info("s", t, [rows, *tail]), helper.make_tensor_value_info("v_next", t, ["N", *tail])]
    if op != if_neuron.OP_TYPE:
        outs.append(helper.make_tensor_value_info("count", t, [rows]))
    function = (if_neuron.make_function(17, body_modes) if op == if_neuron.OP_TYPE
                else if_neuron_seq.make_function(op, 17, body_modes))
    model = helper.make_model(helper.make_graph([node], op, io, outs),
                              opset_imports=[helper.make_opsetid("", 17)] + if_neuron.opset_imports(),
                              functions=[function])
    model.ir_version = 9
    return model


def reference(op, feeds, **attrs):
    attrs = {"threshold": attrs.get("threshold", 1.0), "reset_mode": attrs.get("reset_mode", 0),
             "v_reset": attrs.get("v_reset", 0.0)}
    if op == if_neuron.OP_TYPE:
        return if_neuron.if_step(feeds["x"], feeds["v"], **attrs)
    if op == SEQ:
        s, v = if_neuron_seq.if_seq(feeds["x"], feeds["v"], **attrs)
    else:
        s, v = if_neuron_seq.if_seq_const(feeds["x"], feeds["v"], feeds["steps"], **attrs)
    return s, v, if_neuron_seq.row_counts(s)


def feeds_for(op, n, k, dtype=np.float32, tail=(3, 5), seed=0, special=False):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.6, 1.4, ((k * n) if op == SEQ else n, *tail)).astype(dtype)
    v = rng.uniform(-0.5, 1.0, (n, *tail)).astype(dtype)
    if special and x.size:
        x.flat[:3] = [np.inf, -np.inf, np.nan]
    feeds = {"x": x, "v": v}
    if op == SEQ_CONST:
        feeds["steps"] = np.arange(k, dtype=np.int64)
    return feeds


def session(model, native=None, threads=1):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if native is not None:
        opts.register_custom_ops_library(str(native))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("op", OPS)
def test_models_with_the_ops_pass_full_check(op):
    onnx.checker.check_model(op_model(op), full_check=True)


ATTRS = [{}, {"threshold": 0.37}, {"reset_mode": 1}, {"reset_mode": 1, "v_reset": -0.3, "threshold": 0.8}]


@pytest.mark.parametrize("attrs", ATTRS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_function_body_and_onnx_reference_equal_numpy(op, attrs, dtype):
    mode = if_neuron.RESET_MODES[attrs.get("reset_mode", 0)]
    for body_modes in (if_neuron.RESET_MODES, [mode]):
        model = op_model(op, dtype, body_modes=body_modes, **attrs)
        for n, k in ((4, 1), (2, 5), (3, 7)):
            feeds = feeds_for(op, n, k, dtype)
            want = reference(op, feeds, **attrs)
            assert 0 < want[0].sum() < want[0].size  # firing and silence both exercised
            assert_same(session(model).run(None, feeds), want)
            assert_same(ReferenceEvaluator(model, new_ops=if_neuron_seq.REFERENCE_OPS).run(None, feeds), want)


def test_sequence_reference_is_k_single_steps():
    feeds = feeds_for(SEQ, 3, 6)
    s, v = if_neuron_seq.if_seq(feeds["x"], feeds["v"])
    v_step = feeds["v"]
    for t in range(6):
        s_t, v_step = if_neuron.if_step(feeds["x"][3 * t:3 * t + 3], v_step)
        np.testing.assert_array_equal(s[3 * t:3 * t + 3], s_t)
    np.testing.assert_array_equal(v, v_step)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("attrs", ATTRS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_native_kernel_equals_numpy(native_kernels, op, attrs, dtype, threads):
    model = op_model(op, dtype, tail=(3, 5, 7), **attrs)
    native = session(model, native_kernels, threads)
    body = session(model)
    for n, k in ((0, 3), (1, 1), (5, 3), (2, 7), (300, 4)):  # 300 * 105 neurons spans several blocks
        feeds = feeds_for(op, n, k, dtype, tail=(3, 5, 7), special=True)
        want = reference(op, feeds, **attrs)
        assert_same(native.run(None, feeds), want)
        if n:  # Scan (the function bodies) refuses an empty batch; the runtime never feeds one
            assert_same(body.run(None, feeds), want)


@pytest.mark.parametrize("op", OPS)
def test_native_kernel_refuses_bad_attributes_and_shapes(native_kernels, op):
    with pytest.raises(Exception, match="reset_mode"):
        session(op_model(op, reset_mode=3), native_kernels).run(None, feeds_for(op, 2, 2))
    if op != SEQ_CONST:
        feeds = feeds_for(op, 2, 3)
        feeds["v"] = feeds["v"][:, :2]
        with pytest.raises(Exception, match=op):
            session(op_model(op, tail=(None, None)), native_kernels).run(None, feeds)


@pytest.mark.parametrize("op", [SEQ, SEQ_CONST])
def test_body_poisons_a_reset_mode_it_does_not_implement(op):
    feeds = feeds_for(op, 2, 3)
    v = session(op_model(op, body_modes=["subtract"], reset_mode=1)).run(None, feeds)[1]
    assert np.isnan(v).all()


def test_make_function_refuses_unknown_op_and_old_opset():
    with pytest.raises(ValueError, match="unknown"):
        if_neuron_seq.make_function("IFNeuronTwice", 17)
    with pytest.raises(ValueError, match="opset"):
        if_neuron_seq.make_function(SEQ, 13)
    with pytest.raises(ValueError, match="K stacked"):
        if_neuron_seq.if_seq(np.zeros((5, 2), np.float32), np.zeros((2, 2), np.float32))
