"""Every supported op converts faithfully; everything else is refused with a clear error."""
import logging

import numpy as np
import onnx
import pytest
from conftest import SAMPLE_ONNX
from helpers import rel_err, run_ort
from onnx import helper, numpy_helper
from onnx_builder import GraphBuilder
from onnx_snn_runtime.loop import simulate

import onnx_snn
from onnx_snn.errors import ModelLoadError, OptionError, UnsupportedOpError


def calib(shape, n=64, seed=0):
    return np.random.default_rng(seed).random((n,) + tuple(shape)).astype(np.float32)


def analog_matches(model, data, **options):
    """The rescaled ANN with max scales equals the original on the calibration data."""
    analog = onnx_snn.Converter(data, mode="max", progress=False, **options)(model, neuron="analog")
    name = model.graph.input[0].name
    for a, b in zip(run_ort(analog, {name: data}), run_ort(model, {name: data})):
        assert rel_err(a, b) < 1e-5
    return analog


def zoo_model():
    """Channels-last input, Constant nodes, Pad, grouped Conv, residual Add, Concat, pools, ReLU6,
    Squeeze/Unsqueeze, Identity/Dropout, Gemm, Softmax at the output."""
    b = GraphBuilder(seed=3)
    w_node = helper.make_node("Constant", [], ["w_const"], value=numpy_helper.from_array(
        b.rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.5))
    b.nodes.append(w_node)
    x = b.op("Transpose", ["x"], perm=[0, 3, 1, 2])                         # NHWC -> NCHW
    x = b.op("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    c1 = b.op("Relu", [b.op("Conv", [x, "w_const", b.rand(8)])])           # [N, 8, 10, 10]
    c2 = b.op("Conv", [c1, b.rand(8, 2, 3, 3), b.rand(8)], group=4, pads=[1, 1, 1, 1])
    r = b.op("Relu", [b.op("Add", [c2, c1])])                                # residual
    r = b.op("Identity", [r])
    r = b.op("Dropout", [r])
    cat = b.op("Concat", [r, b.op("Clip", [b.op("Conv", [r, b.rand(4, 8, 1, 1, scale=3.0)]),
                                            b.const(np.float32(0)), b.const(np.float32(6))])], axis=1)
    p = b.op("AveragePool", [cat], kernel_shape=[2, 2], strides=[2, 2])       # [N, 12, 5, 5]
    mp = b.op("MaxPool", [b.op("Relu", [b.op("Conv", [p, b.rand(8, 12, 1, 1)])])], kernel_shape=[2, 2])
    g = b.op("GlobalAveragePool", [mp])
    rm = b.op("ReduceMean", [p], axes=[2, 3], keepdims=1)
    s = b.op("Squeeze", [b.op("Concat", [g, rm], axis=1), b.const(np.array([2, 3], np.int64))])
    s = b.op("Unsqueeze", [s, b.const(np.array([2], np.int64))])
    f = b.op("Flatten", [s])
    h = b.op("Relu", [b.op("Gemm", [f, b.rand(16, 20), b.rand(16)], transB=1)])
    z = b.op("MatMul", [h, b.rand(16, 5)])
    y = b.op("Softmax", [b.op("Add", [z, b.rand(5)])], axis=1)
    return b.model({"x": ["N", 8, 8, 3]}, [y])


def test_zoo_rescaled_ann_is_exact_and_snn_converges():
    model = zoo_model()
    data = calib((8, 8, 3))
    analog = onnx_snn.Converter(data, mode="max", progress=False)(model, neuron="analog")
    logits = run_ort(onnx_snn.Converter(data, mode="max", progress=False, fuse_flag=False)
                     (model, neuron="analog"), {"x": data})[0]
    # the Softmax is dropped: the analog model outputs the logits; its softmax is the original output
    soft = np.exp(logits - logits.max(1, keepdims=True))
    assert rel_err(soft / soft.sum(1, keepdims=True), run_ort(model, {"x": data})[0]) < 1e-5
    assert rel_err(run_ort(analog, {"x": data})[0], logits) < 1e-5
    converter = onnx_snn.Converter(data, mode="max", progress=False)
    snn = converter(model)
    clip = next(entry for entry in converter.report if entry["op"] == "Clip")
    assert clip["lambda"] <= 6.0 and clip["max"] > 0
    assert onnx_snn.spec(snn).converter["dropped_softmax"]
    sums = next(iter(simulate(__import__("onnxruntime").InferenceSession(
        snn.SerializeToString(), providers=["CPUExecutionProvider"]), {"x": data}, 512).values()))
    errors = [rel_err(sums[T - 1] / T, logits) for T in (8, 32, 128, 512)]
    print("zoo SNN relative error at T=8, 32, 128, 512:", errors)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.05  # rate coding converges


def test_relu6_lambda_never_exceeds_the_clip():
    b = GraphBuilder()
    y = b.op("Clip", [b.op("Conv", ["x", b.rand(4, 1, 3, 3, scale=20.0)]), b.const(np.float32(0)), b.const(np.float32(6))])
    model = b.model({"x": ["N", 1, 6, 6]}, [y])
    converter = onnx_snn.Converter(calib((1, 6, 6)), mode="max", progress=False)
    converter(model)
    assert converter.report[0]["max"] == 6.0 and converter.report[0]["lambda"] == 6.0


def running_max_reference(x, lam, T, k=2):
    """numpy: IF neurons fed a constant current x/λ, then a 2x2 running max of the λ·spikes.
    Like the step model, it multiplies by float32(1/λ) rather than dividing by λ."""
    inv, lam = np.float32(1.0 / lam), np.float32(lam)
    v = np.zeros_like(x)
    sums = np.zeros_like(x)
    n, c, h, w = x.shape
    pool = lambda a: a.reshape(n, c, h // k, k, w // k, k).max(axis=(3, 5))  # noqa: E731
    total = 0
    for _ in range(T):
        v = v + x * inv
        s = (v >= 1).astype(x.dtype)
        v = v - s
        step = pool(sums + s * lam) - pool(sums)
        tol = 4 * np.finfo(np.float32).eps * (sums.max() + lam)  # float32 rounding of the sums
        assert (np.isclose(step, 0, atol=tol) | np.isclose(step, lam, atol=tol)).all()  # a spike train
        total = total + step
        sums = sums + s * lam
    return total


def test_running_max_pool_equals_numpy_reference_and_tracks_the_max_rate():
    b = GraphBuilder()
    y = b.op("MaxPool", [b.op("Relu", ["x"])], kernel_shape=[2, 2], strides=[2, 2])
    model = b.model({"x": ["N", 3, 4, 4]}, [y])
    data = calib((3, 4, 4), n=5, seed=9)
    converter = onnx_snn.Converter(data, mode="max", progress=False)
    snn = converter(model)
    spec = onnx_snn.spec(snn)
    assert [s.kind for s in spec.states] == ["membrane", "maxpool_sum"]
    sess = __import__("onnxruntime").InferenceSession(snn.SerializeToString(), providers=["CPUExecutionProvider"])
    T = 64
    out = simulate(sess, {"x": data}, T)[y]
    lam = converter.report[0]["lambda"]
    np.testing.assert_allclose(out[-1], running_max_reference(data, lam, T), rtol=1e-5)
    ann = run_ort(model, {"x": data})[0]
    assert np.abs(out[-1] / T - ann).max() <= lam / T * (1 + 1e-4)  # max of the rates, to one spike


@pytest.mark.parametrize("strategy", ["before_neuron", "plain"])
def test_other_maxpool_strategies(strategy):
    b = GraphBuilder()
    h = b.op("MaxPool", [b.op("Relu", [b.op("Conv", ["x", b.rand(4, 2, 3, 3)])])], kernel_shape=[2, 2])
    y = b.op("Relu", [b.op("Conv", [h, b.rand(3, 4, 3, 3)])])
    model = b.model({"x": ["N", 2, 8, 8]}, [y])
    data = calib((2, 8, 8))
    analog = analog_matches(model, data, maxpool=strategy)
    ops = [n.op_type for n in analog.graph.node]
    if strategy == "before_neuron":
        assert ops.index("MaxPool") < ops.index("Clip")  # pooling now feeds the first neuron
    snn = onnx_snn.Converter(data, mode="max", progress=False, maxpool=strategy)(model)
    assert all(s.kind == "membrane" for s in onnx_snn.spec(snn).states)


def test_external_data_and_old_opset(tmp_path):
    model = onnx.load(SAMPLE_ONNX)
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    data = calib((1, 28, 28), n=32)
    snn = onnx_snn.Converter(data, progress=False)(tmp_path / "ext.onnx")
    assert len(onnx_snn.spec(snn).states) == 3
    b = GraphBuilder(opset=13)
    y = b.op("Relu", [b.op("Conv", ["x", b.rand(2, 1, 3, 3)])])
    snn = onnx_snn.Converter(data, progress=False)(b.model({"x": ["N", 1, 28, 28]}, [y]))
    assert next(o.version for o in snn.opset_import if o.domain == "") == 15


def test_layer_that_never_fires_gets_a_safe_scale_and_a_warning(caplog):
    b = GraphBuilder()
    y = b.op("Relu", [b.op("Conv", ["x", b.rand(2, 1, 3, 3), b.const(np.full(2, -100, np.float32))])])
    model = b.model({"x": ["N", 1, 6, 6]}, [y])
    converter = onnx_snn.Converter(calib((1, 6, 6)), progress=False)
    with caplog.at_level(logging.WARNING):
        snn = converter(model)
    assert "never activated" in caplog.text
    assert converter.report[0]["lambda"] == 1.0
    out = simulate(__import__("onnxruntime").InferenceSession(snn.SerializeToString(),
                   providers=["CPUExecutionProvider"]), {"x": calib((1, 6, 6), n=4)}, 5)[y]
    assert np.isfinite(out).all() and (out == 0).all()


def unsupported_models():
    cases = {}
    b = GraphBuilder()
    cases["Sigmoid"] = (b, b.op("Sigmoid", [b.op("Conv", ["x", b.rand(2, 1, 3, 3)])]))
    b = GraphBuilder()
    cases["LeakyRelu"] = (b, b.op("LeakyRelu", ["x"]))
    b = GraphBuilder()
    r = b.op("Relu", ["x"])
    cases["Mul"] = (b, b.op("Mul", [r, r]))
    b = GraphBuilder()
    cases["Softmax"] = (b, b.op("Relu", [b.op("Softmax", ["x"])]))
    b = GraphBuilder()
    cases["Clip"] = (b, b.op("Clip", ["x", b.const(np.float32(-1)), b.const(np.float32(1))]))
    b = GraphBuilder()
    cases["Conv"] = (b, b.op("Conv", ["x", "x"]))
    return cases


@pytest.mark.parametrize("op", list(unsupported_models()))
def test_unsupported_op_is_refused_naming_node_and_op(op):
    b, y = unsupported_models()[op]
    model = b.model({"x": [1, 1, 3, 3]}, [y])
    node = next(n for n in model.graph.node if n.op_type == op)
    with pytest.raises(UnsupportedOpError) as info:
        onnx_snn.Converter(calib((1, 3, 3)), progress=False)(model)
    assert node.name in str(info.value) and f"op {op}" in str(info.value) and "Supported ops" in str(info.value)


def test_custom_domain_op_is_refused():
    b = GraphBuilder()
    b.nodes.append(helper.make_node("Swish", ["x"], ["y"], name="my_swish", domain="com.example"))
    model = helper.make_model(helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 4])],
                                                [helper.make_tensor_value_info("y", 1, [1, 4])]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpError, match="my_swish.*com.example.Swish"):
        onnx_snn.Converter(calib((4,)), progress=False)(model)


@pytest.mark.parametrize("options,match", [
    ({"mode": "fast"}, "mode"), ({"mode": "0%"}, "percentile"), ({"mode": 2.0}, r"\(0, 1\]"),
    ({"maxpool": "avg"}, "maxpool"), ({"reset_mode": "hard"}, "reset_mode"), ({"batch_size": 0}, "batch_size"),
    ({"bins": 1000}, "power of two"), ({"exporter": "jit"}, "exporter"), ({"v_init": float("nan")}, "finite"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(OptionError, match=match):
        onnx_snn.Converter(calib((1, 3, 3)), **options)


@pytest.mark.parametrize("source,match", [
    ("missing.onnx", "does not exist"), (".", "not a file"), (b"\x00\x01garbage" * 10, "not an ONNX model"),
])
def test_bad_model_files_are_refused(source, match, tmp_path):
    if isinstance(source, bytes):
        path = tmp_path / "bad.onnx"
        path.write_bytes(source)
        source = path
    with pytest.raises(ModelLoadError, match=match):
        onnx_snn.Converter(calib((1, 3, 3)), progress=False)(source)


def test_empty_file_and_converted_model_are_refused(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        onnx_snn.Converter(calib((1, 28, 28)), progress=False)(tmp_path / "empty.onnx")
    snn = onnx_snn.Converter(calib((1, 28, 28)), progress=False)(SAMPLE_ONNX)
    with pytest.raises(ModelLoadError, match="already contains onnx_snn neurons"):
        onnx_snn.Converter(calib((1, 28, 28)), progress=False)(snn)


def test_error_names_the_failing_pass():
    b = GraphBuilder()
    model = b.model({"x": [1, 4]}, [b.op("Sigmoid", ["x"])])
    with pytest.raises(UnsupportedOpError, match=r"^\[CheckSupport\]"):
        onnx_snn.Converter(calib((4,)), progress=False)(model)


def test_generated_node_names_never_collide_with_existing_ones():
    b = GraphBuilder()
    r1 = b.op("Relu", ["x"])
    b.nodes[-1].name = "Relu_1"  # the name the canonicaliser would give the second, unnamed Relu
    y = b.op("Relu", [b.op("Mul", [r1, b.const(np.float32(2))])])
    b.nodes[-1].name = ""
    converter = onnx_snn.Converter(calib((4,)), progress=False)
    converter(b.model({"x": ["N", 4]}, [y]))
    names = [entry["node"] for entry in converter.report]
    assert len(names) == 2 and len(set(names)) == 2 and "Relu_1" in names


def test_overflowing_activations_are_a_calibration_error():
    from onnx_snn.errors import CalibrationError
    b = GraphBuilder()
    big = b.op("Mul", [b.op("Mul", ["x", b.const(np.float32(1e38))]), b.const(np.float32(100))])  # inf
    y = b.op("Relu", [big])
    with pytest.raises(CalibrationError, match="overflows"):
        onnx_snn.Converter(calib((4,)) + 1, mode="99%", progress=False)(b.model({"x": ["N", 4]}, [y]))
