"""Calibrate: one NeuronSite per ReLU/Clip with its lambda, against numpy; the graph is unchanged."""
import logging

import numpy as np
import pytest
from onnx_builder import GraphBuilder

from onnx_snn.errors import CalibrationError
from onnx_snn.model_util import probe_session
from onnx_snn.passes import calibrate
from onnx_snn.passes.base import ContractError
from onnx_snn.passes.calibrate import Calibrate
from onnx_snn.record import ConversionRecord


def _net():
    b = GraphBuilder(seed=8)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(4, 2, 3, 3), b.rand(4)])])
    y = b.op("Relu", [b.op("Gemm", [b.op("Flatten", [h]), b.rand(4 * 4 * 4, 5), b.rand(5)])])
    return b.model({"x": ["N", 2, 6, 6]}, [y])


def _data(n=300, seed=9):
    return np.random.default_rng(seed).standard_normal((n, 2, 6, 6)).astype(np.float32)


def _activations(model, x, sites) -> list[np.ndarray]:
    """Each site's output on ``x``, from onnxruntime on the unconverted model."""
    names = [s.output for s in sites]
    return probe_session(model, names).run(names, {"x": x})


def _per_channel(act: np.ndarray) -> np.ndarray:
    """Activations as [channels, values] (axis 1 is the channel axis)."""
    return np.moveaxis(act, 1, 0).reshape(act.shape[1], -1)


# -- the probe (tail statistics in the graph) against the dense path ---------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mode", ["99.9%", "99.99%", "100%", 0.5, 0.2])
def test_probe_statistics_equal_the_dense_path(mode, per_channel, monkeypatch):
    """The tail probe and binning every activation in numpy give the same lambda (within the
    dense histogram's bin width) and the same share above it."""
    model, x = _net(), _data()

    def run():
        result = Calibrate(x, mode, per_channel=per_channel, batch_size=64, progress=False)(model)
        return [site.to_json() for site in result.record.sites]

    dense_path = calibrate.Calibrate._dense
    with monkeypatch.context() as m:
        m.setattr(calibrate.Calibrate, "_dense", None)  # the probe path must serve these modes alone
        tails = run()
    monkeypatch.setattr(calibrate.Calibrate, "_tails", dense_path)
    dense = run()
    assert len(tails) == len(dense) == 2
    assert [np.shape(t["lambda"]) for t in tails] == ([(4,), (5,)] if per_channel else [(), ()])
    for t, d in zip(tails, dense):
        lt, ld = np.atleast_1d(t["lambda"]), np.atleast_1d(d["lambda"])
        assert lt.shape == ld.shape
        width = 2 * np.max(ld) / (4096 if per_channel else 1 << 16)
        assert np.all(np.abs(lt - ld) <= width + 1e-6), (t, d)
        assert t["max"] == d["max"] and abs(t["share_above"] - d["share_above"]) <= 2e-3


def test_sorted_data_that_defeats_the_first_floor_gets_a_second_pass(caplog):
    """The first batch's activations are far larger than the rest: its floor lies above the
    99.8% quantile of all the data, so the pass runs again with floor 0, and the result is exact."""
    model = _net()
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2048, 2, 6, 6)).astype(np.float32)
    x[:64] *= 50  # the first batch: its top 4 % are 0.12 % of all values, fewer than the top 0.2 %
    caplog.set_level(logging.INFO, logger="onnx_snn.passes.calibrate")
    sites = Calibrate(x, "99.8%", batch_size=64, progress=False)(model).record.sites
    assert "second pass" in caplog.text
    acts = _activations(model, x, sites[:1])[0]
    exact = np.quantile(acts.ravel(), 0.998, method="inverted_cdf")
    assert abs(sites[0].lam - exact) <= 2 * acts.max() / (1 << 16)
    # a one-shot generator cannot be read twice: it gets floor 0 from the start, same lambda
    caplog.clear()
    gen = (x[s:s + 64] for s in range(0, len(x), 64))
    again = Calibrate(gen, "99.8%", batch_size=64, progress=False)(model).record.sites
    assert "second pass" not in caplog.text
    assert abs(again[0].lam - exact) <= 2 * acts.max() / (1 << 16)


@pytest.mark.parametrize("dense_tails", [True, False])
def test_nan_activations_are_refused(monkeypatch, dense_tails):
    """onnxruntime's ReduceMax skips NaN: the probe's sum must still refuse them (in the second
    batch, which the probe runs); numpy's max does not skip them."""
    b = GraphBuilder(seed=11)
    big = b.const(np.array(1e38, np.float32))
    h = b.op("Sub", [b.op("Mul", ["x", big]), b.op("Mul", ["x", big])])  # inf - inf = NaN where x overflows
    y = b.op("Relu", [b.op("Conv", [h, b.rand(2, 1, 1, 1)])])
    model = b.model({"x": ["N", 1, 4, 4]}, [y])
    x = np.full((8, 1, 4, 4), 0.5, np.float32)
    x[5, 0, 1, 1] = 10.0  # 1e39 overflows to inf in float32
    monkeypatch.setattr(calibrate.Calibrate, "_dense", None)
    monkeypatch.setattr(calibrate, "DENSE_TAILS", dense_tails)
    with pytest.raises(CalibrationError, match="NaN"):
        Calibrate(x, "99.9%", batch_size=4, progress=False)(model)
    # the same model on data that does not overflow calibrates
    assert Calibrate(np.full((8, 1, 4, 4), 0.5, np.float32), "99.9%", batch_size=4, progress=False)(model).record.sites


# -- lambda per site against numpy -------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
def test_max_mode_lambda_is_the_exact_max_of_each_site(per_channel):
    model, x = _net(), _data()
    result = Calibrate(x, "max", per_channel=per_channel, batch_size=64, progress=False)(model)
    sites = result.record.sites
    assert [s.node for s in sites] == [n.name for n in model.graph.node if n.op_type == "Relu"]
    assert [s.op for s in sites] == ["Relu", "Relu"]
    for site, act in zip(sites, _activations(model, x, sites)):
        expected = _per_channel(act).max(axis=1) if per_channel else np.array([act.max()])
        np.testing.assert_array_equal(np.atleast_1d(site.lam), expected.astype(np.float64))
        assert site.max == act.max() and site.share_above == 0.0 and site.dead_channels == 0
    assert result.record.calibration.mode == "max" and result.record.calibration.samples == len(x)
    assert result.record.calibration.per_channel is per_channel


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("q", [99.0, 99.9])  # 99 %: the dense histogram; 99.9 %: the tail probe
def test_percentile_lambda_is_numpys_quantile_within_a_bin(q, per_channel):
    model, x = _net(), _data()
    sites = Calibrate(x, f"{q}%", per_channel=per_channel, batch_size=64, progress=False)(model).record.sites
    bins = 4096 if per_channel else 1 << 16
    clipped = []
    for site, act in zip(sites, _activations(model, x, sites)):
        rows = _per_channel(act) if per_channel else act.reshape(1, -1)
        lam = np.atleast_1d(site.lam)
        assert lam.shape == (len(rows),)
        for c, row in enumerate(rows):
            exact = np.quantile(row, q / 100, method="inverted_cdf")
            width = 2 * row.max() / bins  # the histograms' documented bound on the bin width
            assert exact - 1e-6 <= lam[c] <= exact + width + 1e-6, (site.node, c, lam[c], exact, width)
        clipped.append(bool((lam < rows.max(axis=1)).any()))
        share = np.mean(act > np.asarray(lam).reshape((1, -1) + (1,) * (act.ndim - 2)) if per_channel
                        else act > lam[0])
        assert abs(site.share_above - share) <= 2e-3
    assert clipped[0]  # the conv layer's tail was clipped: a real percentile, not the max


@pytest.mark.parametrize("mode", ["max", "99.9%"])
def test_clip_keeps_lambda_at_most_its_max(mode):
    """ReLU6: activations beyond 6 are cut by the Clip, so lambda <= 6 (here = 6: it saturates)."""
    b = GraphBuilder(seed=2)
    six = b.op("Clip", [b.op("Gemm", ["x", b.rand(4, 6, scale=4.0), b.rand(6)]), b.const(np.float32(0)),
                        b.const(np.float32(6))])
    y = b.op("Relu", [b.op("Gemm", [six, b.rand(6, 3, scale=0.05), b.rand(3)])])
    model = b.model({"x": ["N", 4]}, [y])
    x = np.random.default_rng(3).standard_normal((200, 4)).astype(np.float32)
    result = Calibrate(x, mode, progress=False)(model)
    clip, relu = result.record.sites
    assert (clip.op, clip.clip_max, relu.op, relu.clip_max) == ("Clip", 6.0, "Relu", None)
    acts = _activations(model, x, [clip, relu])
    pre = probe_session(model, [model.graph.node[0].output[0]]).run(None, {"x": x})[1]
    assert pre.max() > 6  # the Clip really cuts: lambda = 6 is not just the data's max
    assert clip.lam == 6.0 == acts[0].max() and clip.lam <= clip.clip_max
    if mode == "max":
        assert relu.lam == float(acts[1].max())
    per_channel = Calibrate(x, mode, per_channel=True, progress=False)(model).record.sites[0]
    assert max(per_channel.lam) == 6.0 and len(per_channel.lam) == 6
    Calibrate(x, mode, progress=False).ensures(result.model, result.record)


def test_graph_is_unchanged_and_ensures_holds():
    model, x = _net(), _data(64)
    before = model.SerializeToString()
    given = ConversionRecord()
    pass_ = Calibrate(x, "99.9%", progress=False)
    result = pass_(model, given)
    assert result.modified is False
    assert result.model.SerializeToString() == before and model.SerializeToString() == before
    assert not [p for p in result.model.metadata_props]  # Calibrate writes no metadata
    assert given.sites == [] and given.calibration is None  # the caller's record is not touched
    pass_.ensures(result.model, result.record)
    # ensures catches a broken guarantee: a non-positive lambda, a Clip's lambda above c, a missing site
    result.record.sites[0].lam = 0.0
    with pytest.raises(ContractError, match="finite and positive"):
        pass_.ensures(result.model, result.record)
    result.record.sites.pop()
    with pytest.raises(ContractError, match="not the graph's"):
        pass_.ensures(result.model, result.record)


def test_ensures_refuses_a_clip_lambda_above_its_max():
    b = GraphBuilder(seed=2)
    y = b.op("Clip", [b.op("Gemm", ["x", b.rand(4, 3), b.rand(3)]), b.const(np.float32(0)), b.const(np.float32(6))])
    model = b.model({"x": ["N", 4]}, [y])
    pass_ = Calibrate(np.ones((4, 4), np.float32), "max", progress=False)
    result = pass_(model)
    result.record.sites[0].lam = 6.5
    with pytest.raises(ContractError, match="exceeds its Clip"):
        pass_.ensures(result.model, result.record)


# -- warnings about the data -------------------------------------------------------------------------

def test_unscaled_8bit_looking_inputs_get_a_warning(caplog):
    """Float inputs that hold only whole numbers up to 255 look like images not divided by 255."""
    model = _net()
    pixels = np.random.default_rng(4).integers(0, 256, (64, 2, 6, 6)).astype(np.float32)
    Calibrate(pixels, "max", progress=False)(model)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == calibrate.log.name]
    assert len(warnings) == 1 and "255" in warnings[0].getMessage() and "whole numbers" in warnings[0].getMessage()
    caplog.clear()
    Calibrate(pixels / np.float32(255), "max", progress=False)(model)  # the same data, scaled: no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    Calibrate(pixels + np.float32(0.5), "max", progress=False)(model)  # not whole numbers: no such warning
    assert "whole numbers" not in caplog.text


def test_dead_channels_and_dead_layers_get_a_usable_lambda(caplog):
    """A channel that never fires gets its layer's largest lambda; a layer that never fires gets 1."""
    b = GraphBuilder(seed=3)
    w = b.rng.standard_normal((3, 4)).astype(np.float32)
    w[:, 2] = 0  # channel 2: always relu(-1) = 0
    h = b.op("Relu", [b.op("Gemm", ["x", b.const(w), b.const(np.array([0.1, 0.2, -1.0, 0.3], np.float32))])])
    y = b.op("Relu", [b.op("Gemm", [h, b.const(np.zeros((4, 2), np.float32)), b.const(np.full(2, -1, np.float32))])])
    model = b.model({"x": ["N", 3]}, [y])
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    pass_ = Calibrate(x, "max", per_channel=True, progress=False)
    result = pass_(model)
    layer, dead = result.record.sites
    acts = _activations(model, x, [layer])[0].max(axis=0)
    assert acts[2] == 0 and (np.delete(acts, 2) > 0).all()
    np.testing.assert_array_equal(layer.lam, [acts[0], acts[1], acts.max(), acts[3]])
    assert layer.dead_channels == 1 and layer.max == acts.max()
    assert dead.lam == [1.0, 1.0] and dead.dead_channels == 2 and dead.max == 0.0
    assert "1 of 4 channels never activated" in caplog.text and "never activated" in caplog.text
    assert f"layer {dead.node} (Relu) never activated" in caplog.text
    pass_.ensures(result.model, result.record)


# -- the dense tails, the first batch's floors and the bound on a run's activations -----------------

@pytest.mark.parametrize("mode, per_channel", [("99.9%", False), ("99.9%", True), ("99.8%", True), (0.3, False),
                                               ("100%", True)])
def test_tails_from_the_dense_model_equal_the_probes(mode, per_channel, monkeypatch):
    """Selecting each batch's tail in numpy from the dense model (the default) or in the graph
    (the probe, ``DENSE_TAILS = False``) gives the same statistics, bit for bit."""
    model, x = _net(), _data(700)

    def run():
        result = Calibrate(x, mode, per_channel=per_channel, batch_size=64, progress=False)(model)
        return [site.to_json() for site in result.record.sites]

    dense = run()
    monkeypatch.setattr(calibrate, "DENSE_TAILS", False)
    assert run() == dense


def _old_floor(tail, channel, keep, channels):
    """The first batch's floor as the probe path chose it: per channel, from the values above 0."""
    floor = np.zeros(channels)
    for c in range(channels):
        values = tail if channel is None else tail[channel == c]
        if 0 < keep < len(values) or keep == 0 and len(values):
            k = len(values) - max(keep, 1)
            floor[c] = np.nextafter(np.partition(values, k)[k], -np.inf)
    return floor


@pytest.mark.parametrize("q", [99.9, 99.5, 100.0])
def test_first_batch_floor_is_the_per_channel_partition_of_the_positive_values(q):
    rng = np.random.default_rng(5)
    rows = np.maximum(rng.standard_normal((6, 500)), 0).astype(np.float32)
    rows[1, :] = 0                     # never positive
    rows[2, 3:] = 0                    # fewer positive values than the tail keeps
    rows[3, :] = np.float32(6.0)       # saturated: every value tied
    rows[4, rng.random(500) < 0.3] = 2.5  # ties at the top
    pass_ = Calibrate(None, f"{q}%", per_channel=True, progress=False)
    got = pass_._floor(rows, rows.max(axis=1).astype(np.float64))
    keep = int(np.ceil(calibrate.FLOOR_TAIL * (1.0 - q / 100.0) * rows.shape[1]))
    positive = rows > 0
    channel = np.repeat(np.arange(6), positive.sum(axis=1))
    np.testing.assert_array_equal(got, _old_floor(rows[positive].astype(np.float64), channel, keep, 6))


def test_batches_larger_than_the_byte_bound_are_split(monkeypatch, caplog):
    """A batch whose activations exceed DENSE_BYTES runs in parts that fit, as if batch_size
    were the part's size: the same result as that batch size."""
    model, x = _net(), _data(300)
    sites = calibrate.neuron_sites(calibrate.with_shapes(model))
    per_sample = sum(s.sample_bytes for s in sites)
    assert per_sample == (4 * 4 * 4 + 5) * 4
    monkeypatch.setattr(calibrate, "DENSE_BYTES", 24 * per_sample)
    caplog.set_level(logging.INFO, logger=calibrate.log.name)
    for mode, per_channel in [("99.9%", True), ("99%", False), ("search", True), ("max", False)]:
        options = dict(per_channel=per_channel, progress=False, target_T=4 if mode == "search" else None)
        split = Calibrate(x, mode, batch_size=100, **options)(model).record
        assert "running them 24 samples at a time" in caplog.text
        caplog.clear()
        same = Calibrate(x, mode, batch_size=24, **options)(model).record
        assert "at a time" not in caplog.text
        assert [s.to_json() for s in split.sites] == [s.to_json() for s in same.sites]
        assert split.calibration.samples == len(x)
