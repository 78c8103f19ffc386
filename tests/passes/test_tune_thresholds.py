"""TuneThresholds: each layer's λ tuned against the network's output after T steps, without labels."""
import numpy as np
import pytest
from helpers import rel_err
from onnx import numpy_helper
from onnx_builder import GraphBuilder

from onnx_snn.converter import Converter
from onnx_snn.errors import OptionError
from onnx_snn.model_util import cpu_session
from onnx_snn.passes.base import PassManager
from onnx_snn.passes.correct_bias import segment
from onnx_snn.passes.tune_thresholds import FACTORS, TuneThresholds, ann_model, output_error, take_samples
from onnx_snn.record import ConversionRecord

T = 4


def net(clip: float | None = None):
    b = GraphBuilder(seed=7)
    bounds = [b.const(np.float32(0)), b.const(np.float32(clip))] if clip is not None else []
    act = (lambda x: b.op("Clip", [x, *bounds])) if clip is not None else (lambda x: b.op("Relu", [x]))
    h = act(b.op("Conv", ["x", b.rand(4, 2, 3, 3), b.rand(4)]))
    h = act(b.op("Conv", [h, b.rand(4, 4, 3, 3), b.rand(4)]))
    y = b.op("Gemm", [b.op("Flatten", [h]), b.rand(3, 4 * 4 * 4), b.rand(3)], transB=1)
    return b.model({"x": ["N", 2, 8, 8]}, [y])


def data(n=96, seed=3):
    return np.random.default_rng(seed).random((n, 2, 8, 8)).astype(np.float32)


def before_tuning(model, x, mode="max"):
    converter = Converter(x, mode=mode, target_T=T, threshold_tuning=True, progress=False, fold_scales=False)
    passes = converter.passes()
    k = next(i for i, p in enumerate(passes) if isinstance(p, TuneThresholds))
    return passes[k], PassManager(passes[:k], check=True)(model, ConversionRecord(converter.config))


def output_after(model, record, x) -> np.ndarray:
    """The network's first output averaged over T steps, simulated step by step."""
    out = model.graph.output[0].name
    return segment(model, record.states, out, set()).run({"x": x}, {}, T, record=False)


def test_ann_model_is_the_source_network():
    model, x = net(), data()
    _, before = before_tuning(model, x)
    ann = ann_model(before.model, before.record)
    # the same function; x/λ·λ rounds in float32
    assert rel_err(cpu_session(ann).run(None, {"x": x})[0], cpu_session(model).run(None, {"x": x})[0]) < 1e-6


def test_clipped_sites_keep_their_ceiling_in_the_ann_and_in_the_tuned_scales():
    model, x = net(clip=0.3), data()
    tune, before = before_tuning(model, x)
    ann = ann_model(before.model, before.record)
    assert rel_err(cpu_session(ann).run(None, {"x": x})[0], cpu_session(model).run(None, {"x": x})[0]) < 1e-6
    result = tune(before.model, before.record)
    for site in result.record.sites:
        assert np.max(site.lam) <= site.clip_max * (1 + 1e-6)


def test_tuning_lowers_the_output_error_and_records_what_it_did():
    model, x = net(), data()
    tune, before = before_tuning(model, x, mode=0.3)  # λ far too small: clipping costs accuracy
    result = tune(before.model, before.record)
    tuning = result.record.tuning
    assert tuning.samples == min(len(x), tune.samples) and tuning.simulations == 1 + len(FACTORS) * 2
    assert tuning.error_after < tuning.error_before
    factors = [site.threshold_factor for site in result.record.sites]
    assert set(factors) <= {1.0, *FACTORS} and any(f > 1 for f in factors)
    for old, new in zip(before.record.sites, result.record.sites):
        np.testing.assert_allclose(np.asarray(new.lam), np.asarray(old.lam) * new.threshold_factor, rtol=1e-12)
    # the recorded errors are those of the models before and after, simulated afresh
    feeds = take_samples(x, model, [], tune.samples, 256)["x"]
    target = cpu_session(model).run(None, {"x": feeds})[0].astype(np.float64)
    error = output_error(target)
    assert error(output_after(before.model, before.record, feeds)) == pytest.approx(tuning.error_before, rel=1e-6)
    assert error(output_after(result.model, result.record, feeds)) == pytest.approx(tuning.error_after, rel=1e-6)


def test_scale_constants_are_one_over_lambda_and_lambda():
    model, x = net(), data()
    tune, before = before_tuning(model, x, mode=0.3)
    result = tune(before.model, before.record)
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    nodes = {n.name: n for n in result.model.graph.node}
    for site in result.record.sites:
        lam = np.asarray(site.lam, np.float64)
        np.testing.assert_allclose(inits[nodes[site.scale_out].input[1]].reshape(-1), lam.reshape(-1), rtol=1e-7)
        np.testing.assert_allclose(inits[nodes[site.scale_in].input[1]].reshape(-1), 1 / lam.reshape(-1), rtol=1e-7)


def test_output_error_is_kl_for_class_scores_and_mse_otherwise():
    target = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    assert output_error(target)(target) == pytest.approx(0.0, abs=1e-12)
    p = np.exp(target) / np.exp(target).sum(1, keepdims=True)
    out = np.zeros_like(target)
    assert output_error(target)(out) == pytest.approx(np.mean(np.sum(p * np.log(p * 3), axis=1)))
    assert output_error(np.ones((4, 1)))(np.zeros((4, 1))) == pytest.approx(1.0)


def test_tuning_needs_a_target_T():
    with pytest.raises(OptionError, match="target_T"):
        Converter(data(), mode="max", threshold_tuning=True)


def test_the_converter_records_the_factors_in_the_step_model():
    import onnx_snn
    snn = Converter(data(), mode=0.3, target_T=T, threshold_tuning=True, progress=False)(net())
    spec = onnx_snn.spec(snn)
    assert spec.converter["threshold_tuning"] is True
    assert all("threshold_factor" in layer for layer in spec.calibration["layers"])
