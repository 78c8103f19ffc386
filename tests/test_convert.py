"""End to end: the committed sample CNN through every front door, the step-model format, accuracy."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, SAMPLE_ONNX
from helpers import rel_err, run_ort
from onnx.reference import ReferenceEvaluator
from onnx_snn_runtime.format import KEY_FORMAT, StepModelSpec
from onnx_snn_runtime.loop import simulate

import onnx_snn
from onnx_snn.ops import if_neuron


@pytest.fixture(scope="module")
def snn_999(bundled):
    xc = bundled[0]
    converter = onnx_snn.Converter(xc, mode="99.9%", progress=False)
    return converter(SAMPLE_ONNX), converter


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_sample_cnn_snn_reaches_ann_accuracy_at_T50(snn_999, bundled):
    _, _, xt, yt = bundled
    ann = (run_ort(onnx.load(SAMPLE_ONNX), {"input": xt})[0].argmax(1) == yt).mean()
    sess = session(snn_999[0])
    logits = simulate(sess, {"input": xt}, 50)["logits"]
    acc = (logits.argmax(-1) == yt).mean(axis=1)
    print(f"ANN {ann:.4f}; SNN at T=1,10,25,50: {acc[0]:.4f} {acc[9]:.4f} {acc[24]:.4f} {acc[49]:.4f}")
    assert ann > 0.85
    assert acc[49] >= ann - 0.010, (acc[49], ann)
    assert acc[0] < acc[49]  # rate coding improves with time: the loop really integrates


def test_step_model_format(snn_999):
    model, converter = snn_999
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    spec = onnx_snn.spec(model)
    assert [s.input for s in spec.states] == ["snn.v0", "snn.v1", "snn.v2"]
    assert [s.output for s in spec.states] == ["snn.v0.next", "snn.v1.next", "snn.v2.next"]
    assert [s.shape for s in spec.states] == [[None, 32, 26, 26], [None, 32, 11, 11], [None, 32, 3, 3]]
    assert spec.outputs == {"logits": "sum"}
    assert spec.calibration["mode"] == "99.9%" and len(spec.calibration["layers"]) == 3
    assert spec.source_sha256 == __import__("hashlib").sha256(SAMPLE_ONNX.read_bytes()).hexdigest()
    graph_inputs = [i.name for i in model.graph.input]
    graph_outputs = [o.name for o in model.graph.output]
    assert graph_inputs == ["input", "snn.v0", "snn.v1", "snn.v2"]
    assert graph_outputs == ["logits", "snn.v0.next", "snn.v1.next", "snn.v2.next"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch stays dynamic
    ops = [n.op_type for n in model.graph.node]
    assert "Relu" not in ops and "BatchNormalization" not in ops and ops.count("IFNeuron") == 3
    assert converter.report[0]["lambda"] == spec.calibration["layers"][0]["lambda"]


def test_step_model_runs_the_same_in_onnx_reference(snn_999, bundled):
    """onnxruntime (function body) and onnx.reference (our OpRun) agree over a few steps."""
    model = snn_999[0]
    x = bundled[2][:8]
    spec = onnx_snn.spec(model)
    reference = ReferenceEvaluator(model, new_ops=[if_neuron.IFNeuron])
    sess = session(model)
    states_a = states_b = {s.input: s.initial(len(x)) for s in spec.states}
    names = ["logits"] + [s.output for s in spec.states]
    for _ in range(5):
        a = dict(zip(names, sess.run(names, {"input": x, **states_a})))
        b = dict(zip(names, reference.run(names, {"input": x, **states_b})))
        assert rel_err(a["logits"], b["logits"]) < 1e-4
        states_a = {s.input: a[s.output] for s in spec.states}
        states_b = {s.input: b[s.output] for s in spec.states}


def test_rescaled_ann_equals_original_with_max_scales(bundled):
    """Mul(1/λ) → Clip(0,1) → Mul(λ) with λ = calibration max is the identity on the calibration data."""
    xc = bundled[0][:300]
    analog = onnx_snn.Converter(xc, mode="max", progress=False)(SAMPLE_ONNX, neuron="analog")
    assert "Relu" not in [n.op_type for n in analog.graph.node]
    original = run_ort(onnx.load(SAMPLE_ONNX), {"input": xc})[0]
    err = rel_err(run_ort(analog, {"input": xc})[0], original)
    assert err < 1e-5, err


def test_rescaled_ann_clips_at_lambda_like_numpy(bundled):
    """With a percentile, the rescaled ANN equals a numpy restatement: min(relu(z), λ) at each layer."""
    xc = bundled[0][:200]
    converter = onnx_snn.Converter(xc, mode="99%", progress=False, maxpool="plain")
    analog = converter(SAMPLE_ONNX, neuron="analog")
    # numpy restatement of the folded network with the recorded λ
    from onnx_snn.passes.base import PassManager
    from onnx_snn.passes.maxpool import PlaceMaxPool
    passes = converter.passes()
    folded = passes[:next(i for i, p in enumerate(passes) if isinstance(p, PlaceMaxPool))]  # up to FoldBatchNorm
    ann = PassManager(folded)(onnx.load(SAMPLE_ONNX)).model
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in ann.graph.initializer}
    convs = [n for n in ann.graph.node if n.op_type == "Conv"]
    gemm = next(n for n in ann.graph.node if n.op_type == "Gemm")
    lams = [entry["lambda"] for entry in converter.report]
    h = xc.astype(np.float64)
    for conv, lam in zip(convs, lams):
        w, b = weights[conv.input[1]], weights[conv.input[2]]
        win = np.lib.stride_tricks.sliding_window_view(h, w.shape[2:], axis=(2, 3))
        h = np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]
        h = np.minimum(np.maximum(h, 0), lam)
        n, c, hh, ww = h.shape
        h = h[:, :, : hh // 2 * 2, : ww // 2 * 2].reshape(n, c, hh // 2, 2, ww // 2, 2).mean(axis=(3, 5))
    h = h.reshape(len(h), -1)
    wg, bg = weights[gemm.input[1]], weights[gemm.input[2]]
    expected = h @ (wg.T if any(a.name == "transB" and a.i for a in gemm.attribute) else wg) + bg
    assert rel_err(run_ort(analog, {"input": xc})[0], expected) < 1e-5


@pytest.mark.parametrize("front_door", ["onnx-path", "modelproto", "torchscript", "dynamo"])
def test_every_front_door_gives_a_step_model_onnxruntime_runs(front_door, bundled, tmp_path):
    xc, _, xt, yt = bundled
    if front_door in ("torchscript", "dynamo"):
        pytest.importorskip("torch")
        import sys
        sys.path.insert(0, str(ROOT / "models"))
        from sample_cnn import load_trained
        source = load_trained()
    else:
        source = SAMPLE_ONNX if front_door == "onnx-path" else onnx.load(SAMPLE_ONNX)
    exporter = front_door if front_door in ("torchscript", "dynamo") else "dynamo"
    converter = onnx_snn.Converter(xc[:256], mode="99.9%", exporter=exporter, progress=False)
    snn = converter(source)
    path = onnx_snn.save(snn, tmp_path / "cnn.snn.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = StepModelSpec.from_metadata(sess.get_modelmeta().custom_metadata_map)
    assert len(spec.states) == 3
    out = simulate(sess, {sess.get_inputs()[0].name: xt[:200]}, 30, spec)
    acc = (next(iter(out.values()))[-1].argmax(-1) == yt[:200]).mean()
    assert acc > 0.8, acc


def test_per_channel_scales_are_recorded_and_run(bundled):
    xc, _, xt, yt = bundled
    converter = onnx_snn.Converter(xc[:256], mode="99.99%", per_channel=True, progress=False)
    snn = converter(SAMPLE_ONNX)
    lam = np.asarray(converter.report[0]["lambda"])
    assert lam.shape == (32,) and (lam > 0).all() and len(np.unique(lam)) > 1
    out = simulate(session(snn), {"input": xt[:200]}, 30)["logits"]
    assert (out[-1].argmax(-1) == yt[:200]).mean() > 0.8


def test_metadata_of_a_plain_model_is_refused():
    from onnx_snn_runtime.format import FormatError
    with pytest.raises(FormatError, match="not an SNN step model"):
        StepModelSpec.from_metadata({})
    with pytest.raises(FormatError, match="newer"):
        StepModelSpec.from_metadata({KEY_FORMAT: "99"})
    with pytest.raises(FormatError, match="malformed"):
        StepModelSpec.from_metadata({KEY_FORMAT: "1", "onnx_snn.states": json.dumps([{"input": "a"}])})


@pytest.mark.parametrize("name,layers", [("vgg8", 8), ("resnet20", 19), ("maxpool_cnn", 3)])
def test_committed_models_convert_and_run(name, layers, bundled):
    xc, _, xt, yt = bundled
    converter = onnx_snn.Converter(xc[:64], mode="99.9%", progress=False)
    snn = converter(ROOT / "models" / f"{name}.onnx")
    assert len(converter.report) == layers
    out = simulate(session(snn), {"input": xt[:16]}, 4)
    assert np.isfinite(next(iter(out.values()))).all()
