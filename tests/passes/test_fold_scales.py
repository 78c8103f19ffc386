"""Scale folding: the Muls around each neuron move into the weights, and the model computes the
same function (rescaled ANN: 1e-5 relative; SNN: the same spikes but for rounding ties)."""
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import rel_err, run_ort
from onnx_builder import GraphBuilder
from onnx_snn_runtime import Simulator

import onnx_snn
from onnx_snn.converter import Converter
from onnx_snn.passes.base import ContractError, PassManager
from onnx_snn.passes.fold_scales import FoldScales
from onnx_snn.record import ConversionRecord

SAMPLE_ONNX = Path(__file__).resolve().parents[2] / "models" / "sample_cnn.onnx"

TOL = 1e-5


def scale_muls(model) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Mul" and ".scale_" in n.name]


def cnn(head: str):
    """Conv-ReLU-AvgPool-Conv-ReLU, then a head that reads the spikes through linear per-channel ops."""
    b = GraphBuilder(seed=3)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(6, 3, 3, 3), b.rand(6)], pads=[1, 1, 1, 1])])
    h = b.op("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("Relu", [b.op("Conv", [h, b.rand(5, 6, 3, 3), b.rand(5)])])
    if head == "flatten_gemm":
        y = b.op("Gemm", [b.op("Flatten", [h]), b.rand(5 * 2 * 2, 4), b.rand(4)])
    elif head == "global_pool_gemm_transB":
        y = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [h])]), b.rand(4, 5), b.rand(4)], transB=1)
    elif head == "reducemean_matmul":
        y = b.op("MatMul", [b.op("ReduceMean", [h], axes=[2, 3], keepdims=0), b.rand(5, 4)])
    return b.model({"x": ["N", 3, 8, 8]}, [y])


def residual():
    """Scales next to a residual Add cannot fold; the rest can."""
    b = GraphBuilder(seed=4)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(3, 3, 3, 3), b.rand(3)], pads=[1, 1, 1, 1])])
    h = b.op("Relu", [b.op("Add", [b.op("Conv", [h, b.rand(3, 3, 3, 3)], pads=[1, 1, 1, 1]), h])])
    y = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [h])]), b.rand(3, 4)])
    return b.model({"x": ["N", 3, 8, 8]}, [y])


def data(n=96, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("head", ["flatten_gemm", "global_pool_gemm_transB", "reducemean_matmul"])
def test_folded_rescaled_ann_equals_unfolded(head, per_channel):
    model, x = cnn(head), data()
    build = lambda fold: onnx_snn.Converter(x, "max", per_channel=per_channel, progress=False,  # noqa: E731
                                            fold_scales=fold)(model, neuron="analog")
    folded, plain = build(True), build(False)
    assert len(scale_muls(plain)) == 4 and scale_muls(folded) == []
    err = rel_err(run_ort(folded, {"x": x})[0], run_ort(plain, {"x": x})[0])
    assert err <= TOL, err


def test_scale_reaching_a_residual_add_stays():
    model, x = residual(), data()
    build = lambda fold: onnx_snn.Converter(x, "max", progress=False, fold_scales=fold)(model, neuron="analog")  # noqa: E731
    folded, plain = build(True), build(False)
    # the first neuron's output has two readers (the Conv and the skip connection), and the second
    # neuron's input comes from the Add, not from a layer with weights
    kept = sorted(name.rsplit(".", 1)[1] for name in scale_muls(folded))
    assert kept == ["scale_in", "scale_out"], kept
    assert len(scale_muls(plain)) == 4
    err = rel_err(run_ort(folded, {"x": x})[0], run_ort(plain, {"x": x})[0])
    assert err <= TOL, err


def test_bias_shift_folds_into_the_bias_and_spikes_match():
    """With bias correction a constant Add sits between the Conv and its scale: it folds first."""
    model, x = cnn("flatten_gemm"), data(256)
    build = lambda fold: onnx_snn.Converter(x, "99%", target_T=8, bias_correction=True, progress=False,  # noqa: E731
                                            fold_scales=fold)(model)
    folded, plain = build(True), build(False)
    assert scale_muls(folded) == []
    assert not [n.name for n in folded.graph.node if n.name.endswith(".bias_shift")]
    run = lambda m: Simulator(m.SerializeToString(), "cpu", optimize=False).run(x[:64], 8)  # noqa: E731
    a, b = run(folded), run(plain)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_sample_cnn_step_model_keeps_its_predictions(bundled):
    xc, _, xt, _ = bundled
    build = lambda fold: onnx_snn.Converter(xc, "99.9%", progress=False, fold_scales=fold)(SAMPLE_ONNX)  # noqa: E731
    folded, plain = build(True), build(False)
    assert scale_muls(folded) == [] and len(scale_muls(plain)) == 6
    run = lambda m: Simulator(m.SerializeToString(), "cpu", optimize=False).run(xt[:200], 16)  # noqa: E731
    a, b = run(folded), run(plain)
    # a potential within rounding of the threshold may fire a step earlier or later; nothing more
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.99
    assert np.mean(np.isclose(a, b, rtol=1e-4, atol=1e-4)) >= 0.99


# -- the pass itself: its record and the Muls it declines -----------------------------------------

def before_folding(model, x, neuron="analog", **options):
    """The converter's pipeline up to FoldScales: (model, record) as the pass receives them."""
    converter = Converter(x, "max", progress=False, **options)
    passes = converter.passes(neuron=neuron)
    k = next(i for i, p in enumerate(passes) if isinstance(p, FoldScales))
    return PassManager(passes[:k], check=True)(model, ConversionRecord(converter.config))


def test_record_lists_the_folded_muls_and_clears_them_from_their_sites():
    x = data()
    before = before_folding(cnn("flatten_gemm"), x)
    names = [(s.scale_in, s.scale_out) for s in before.record.sites]
    assert all(a and b for a, b in names)
    result = FoldScales()(before.model, before.record)
    assert result.modified
    assert result.record.folded_scales == [n for pair in names for n in pair]
    assert all(s.scale_in is None and s.scale_out is None for s in result.record.sites)
    assert scale_muls(result.model) == [] and len(scale_muls(before.model)) == 4
    # the neurons themselves stay
    assert [s.neuron for s in result.record.sites] == [s.neuron for s in before.record.sites]
    assert {s.neuron for s in result.record.sites} <= {n.name for n in result.model.graph.node}
    # the input record is not touched
    assert before.record.folded_scales == [] and [(s.scale_in, s.scale_out) for s in before.record.sites] == names
    err = rel_err(run_ort(result.model, {"x": x})[0], run_ort(before.model, {"x": x})[0])
    assert err <= TOL, err
    FoldScales().ensures(result.model, result.record)
    with pytest.raises(ContractError, match="still in the graph"):
        FoldScales().ensures(before.model, result.record)


def test_declined_folds_keep_their_names_and_log_why_at_debug(caplog):
    x = data()
    before = before_folding(residual(), x)
    caplog.set_level(logging.DEBUG, logger="onnx_snn.passes.base")
    result = FoldScales()(before.model, before.record)
    first, second = result.record.sites
    # kept: the first neuron's scale_out (two readers) and the second's scale_in (fed by the residual Add)
    assert first.scale_in is None and first.scale_out == before.record.sites[0].scale_out
    assert second.scale_in == before.record.sites[1].scale_in and second.scale_out is None
    assert result.record.folded_scales == [before.record.sites[0].scale_in, before.record.sites[1].scale_out]
    assert {first.scale_out, second.scale_in} <= {n.name for n in result.model.graph.node}
    declined = [r for r in caplog.records if r.name == "onnx_snn.passes.base" and r.levelno == logging.DEBUG
                and r.getMessage().startswith("FoldScales: kept")]
    messages = sorted(r.getMessage() for r in declined)
    assert len(messages) == 2, messages
    assert f"kept {first.scale_out}: " in messages[1] and "several readers" in messages[1]
    assert f"kept {second.scale_in}: " in messages[0]
    FoldScales().ensures(result.model, result.record)


def test_nothing_to_fold_leaves_the_model_unchanged(caplog):
    """A ReLU fed by the graph input and read by the graph output: neither Mul can move."""
    b = GraphBuilder()
    model = b.model({"x": ["N", 5]}, [b.op("Relu", ["x"])])
    x = np.random.default_rng(1).random((8, 5)).astype(np.float32)
    before = before_folding(model, x)
    caplog.set_level(logging.DEBUG, logger="onnx_snn.passes.base")
    result = FoldScales()(before.model, before.record)
    assert result.modified is False
    assert result.model.SerializeToString() == before.model.SerializeToString()
    assert result.record.folded_scales == [] and result.record.sites == before.record.sites
    site = result.record.sites[0]
    assert f"kept {site.scale_in}: x is a graph input" in caplog.text
    assert f"kept {site.scale_out}: " in caplog.text and "graph output" in caplog.text
    lam = np.float32(site.lam)
    np.testing.assert_allclose(run_ort(result.model, {"x": x})[0], np.minimum(x, lam), rtol=1e-6)
