"""Streaming calibration statistics against numpy, and the calibration data forms."""
import numpy as np
import pytest

from onnx_snn.calibration.data import InputSpec, first_input, iterate_batches
from onnx_snn.calibration.mode import Mode, parse_mode
from onnx_snn.calibration.stats import StreamingHistogram
from onnx_snn.errors import DataError, OptionError


def relu_batches(rng, n_batches=12, shape=(64, 3, 5, 5)):
    """Heavy-tailed ReLU-like activations whose scale grows batch after batch (forces re-binning)."""
    return [np.maximum(rng.standard_cauchy(shape) * (1 + i), 0).astype(np.float32) for i in range(n_batches)]


@pytest.mark.parametrize("bins", [64, 1024, 1 << 16])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 0.999, 0.99999])
def test_layer_quantile_within_one_bin_of_numpy(bins, q):
    batches = relu_batches(np.random.default_rng(0))
    hist = StreamingHistogram(1, bins)
    for b in batches:
        hist.update(b)
    everything = np.concatenate([b.ravel() for b in batches])
    exact = np.quantile(everything, q, method="inverted_cdf")
    assert hist.max[0] == everything.max()  # max is exact
    width = hist.bin_width[0]
    assert width <= 2 * everything.max() / bins  # the documented bound on R
    got = hist.quantile(q)[0]
    assert exact - 1e-6 * width <= got <= exact + width * (1 + 1e-5), (got, exact, width)


def test_per_channel_statistics_match_numpy():
    rng = np.random.default_rng(1)
    batches = relu_batches(rng, shape=(32, 4, 6, 6))
    batches = [b * np.array([0.01, 1, 100, 0], np.float32)[None, :, None, None] for b in batches]
    hist = StreamingHistogram(4, 4096)
    for b in batches:
        hist.update(b)
    per_channel = np.concatenate([np.moveaxis(b, 1, 0).reshape(4, -1) for b in batches], axis=1)
    np.testing.assert_array_equal(hist.max, per_channel.max(axis=1))
    got = hist.quantile(0.999)
    for c in range(4):
        exact = np.quantile(per_channel[c], 0.999, method="inverted_cdf")
        assert exact <= got[c] + 1e-12 and got[c] <= exact + hist.bin_width[c] * (1 + 1e-5)
    assert got[3] == 0.0  # a dead channel stays at 0 (the calibrate pass replaces it)


def test_memory_is_bounded_by_bins_not_data():
    hist = StreamingHistogram(8, 256)
    rng = np.random.default_rng(2)
    for _ in range(50):
        hist.update(np.abs(rng.standard_normal((16, 8, 10))).astype(np.float32))
    assert hist.counts.shape == (8, 256) and hist.counts.sum() == 50 * 16 * 10 * 8


def test_share_above_matches_numpy_at_bin_edges():
    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((4000, 1)), 0).astype(np.float32)
    hist = StreamingHistogram(1, 1 << 14)
    hist.update(x)
    lam = hist.quantile(0.99)[0]
    assert abs(hist.share_above(lam)[0] - (x > lam).mean()) <= 1 / len(x)
    assert hist.share_above(x.max())[0] == 0.0


def test_max_only_histogram_keeps_no_bins():
    hist = StreamingHistogram(3, histogram=False)
    hist.update(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    assert hist.counts.size == 0
    np.testing.assert_array_equal(hist.max, [15.0, 19.0, 23.0])
    np.testing.assert_array_equal(hist.quantile(1.0), hist.max)
    with pytest.raises(ValueError, match="histogram"):
        hist.quantile(0.5)


@pytest.mark.parametrize("text,expected", [("max", Mode("max", 1.0)), ("99.9%", Mode("percentile", 99.9)),
                                           ("100%", Mode("percentile", 100.0)), (0.5, Mode("fraction", 0.5)),
                                           ("0.75", Mode("fraction", 0.75)), (1, Mode("fraction", 1.0))])
def test_parse_mode(text, expected):
    assert parse_mode(text) == expected


@pytest.mark.parametrize("bad", ["0%", "100.5%", "abc%", "median", 0, 1.5, -0.1, True, None])
def test_parse_mode_refuses(bad):
    with pytest.raises(OptionError, match="mode"):
        parse_mode(bad)


SPEC = [InputSpec("input", (None, 1, 4, 4), np.dtype(np.float32))]


def collect(data, batch_size=3):
    batches, count = iterate_batches(data, SPEC, batch_size)
    return [b["input"] for b in batches], count


def test_data_forms_all_give_the_same_samples(tmp_path):
    x = np.random.default_rng(4).random((7, 1, 4, 4)).astype(np.float64)
    np.savez(tmp_path / "calib.npz", x=x, y=np.arange(7))
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x), torch.arange(7)), batch_size=3)
    forms = {"array": x, "npz": tmp_path / "calib.npz", "npz-str": str(tmp_path / "calib.npz"),
             "dict": {"input": x}, "iterable": [x[:4], x[4:]], "tuples": [(x[:4], 0), (x[4:], 1)],
             "loader": loader, "tensor": torch.from_numpy(x)}
    for name, data in forms.items():
        batches, _ = collect(data)
        got = np.concatenate(batches)
        assert got.dtype == np.float32, name
        np.testing.assert_allclose(got, x.astype(np.float32), err_msg=name)
    assert collect(x)[1] == 3
    assert first_input(loader).shape == (1, 1, 4, 4)


@pytest.mark.parametrize("data,match", [
    (np.zeros((0, 1, 4, 4)), "empty"),
    ([], "empty"),
    (np.zeros((5, 4, 5)), "shape"),
    (np.zeros((5, 1, 4, 5)), "shape"),
    (np.full((5, 1, 4, 4), np.nan), "NaN"),
    (np.array([["a"] * 16] * 2).reshape(2, 1, 4, 4), "dtype"),
    ("does-not-exist.npz", "does not exist"),
    (None, "no calibration data"),
    (42, "cannot use"),
])
def test_bad_calibration_data_is_refused(data, match):
    with pytest.raises(DataError, match=match):
        collect(data)


def test_float16_activations_use_all_bins():
    x = np.linspace(0, 0.5, 4096, dtype=np.float16).reshape(-1, 1)
    hist = StreamingHistogram(1, 1 << 16)
    hist.update(x)
    exact = np.quantile(x.astype(np.float64), 0.9, method="inverted_cdf")
    assert abs(hist.quantile(0.9)[0] - exact) <= hist.bin_width[0] * 1.001


# -- tail statistics: the probe computes max and tail in the graph ---------------------------------

def _tail_of(hist_floor, batches, channels=1):
    from onnx_snn.calibration.stats import TailHistogram
    hist = TailHistogram(np.full(channels, hist_floor), 4096 if channels > 1 else 1 << 16)
    for b in batches:
        rows = np.moveaxis(b, 1, 0).reshape(channels, -1) if channels > 1 else b.reshape(1, -1)
        mask = rows > hist_floor
        channel = np.nonzero(mask)[0] if channels > 1 else None
        hist.update(rows[mask], channel, rows.shape[1], rows.max(axis=1))
    return hist


@pytest.mark.parametrize("q", [0.9, 0.99, 0.999])
def test_tail_quantile_within_one_tail_bin_of_numpy(q):
    batches = relu_batches(np.random.default_rng(5))
    everything = np.concatenate([b.ravel() for b in batches])
    floor = np.quantile(everything, 0.5, method="inverted_cdf")
    hist = _tail_of(floor, batches)
    assert hist.covers(q).all() and hist.n == everything.size
    exact = np.quantile(everything, q, method="inverted_cdf")
    width = hist.range[0] / hist.bins
    assert exact - 1e-6 * width <= hist.quantile(q)[0] <= exact + width * (1 + 1e-5)
    lam = hist.quantile(q)[0]
    assert abs(hist.share_above(lam)[0] - np.mean(everything > lam)) <= 2 / everything.size + 1e-4


def test_tail_that_starts_above_the_quantile_says_so():
    batches = relu_batches(np.random.default_rng(6))
    everything = np.concatenate([b.ravel() for b in batches])
    hist = _tail_of(np.quantile(everything, 0.995), batches)
    assert not hist.covers(0.99).any() and hist.covers(0.999).all()


def test_tail_quantile_among_zeros_is_the_lowest_bin_edge_not_zero():
    """A layer that fired but whose q-quantile is 0: lambda must stay positive (as the dense
    histogram gives), or 1/lambda would be infinite."""
    from onnx_snn.calibration.stats import TailHistogram
    x = np.zeros(10000)
    x[:20] = np.linspace(0.5, 2.0, 20)
    hist = TailHistogram(np.zeros(1), 1 << 16)
    hist.update(x[x > 0], None, x.size, np.array([x.max()]))
    dense = StreamingHistogram(1, 1 << 16)
    dense.update(x.astype(np.float32).reshape(1, -1))
    lam = hist.quantile(0.99)[0]
    assert 0 < lam <= 2.0 / (1 << 16) * 1.01 and abs(lam - dense.quantile(0.99)[0]) <= 2.0 / (1 << 16)


def test_counters_are_32_bit_until_a_channel_could_overflow_them():
    """Bins count in int32 (half the memory of a wide per-channel histogram) and widen to int64
    before 2^31 values per channel, keeping every count."""
    from onnx_snn.calibration.stats import TailHistogram
    rng = np.random.default_rng(4)
    x = np.abs(rng.standard_normal((16, 3, 10))).astype(np.float32)
    for hist in (StreamingHistogram(3, 64), TailHistogram(np.zeros(3), 64)):
        assert hist.counts.dtype == np.int32
        hist.n = 2**31 - 100  # as if it had seen that many values per channel
        before = hist.counts.astype(np.int64)
        rows = np.moveaxis(x, 1, 0).reshape(3, -1)
        if isinstance(hist, TailHistogram):
            hist.update(rows.ravel(), np.repeat(np.arange(3), rows.shape[1]), rows.shape[1], rows.max(axis=1))
        else:
            hist.update(x)
        assert hist.counts.dtype == np.int64 and hist.counts.sum() - before.sum() == x.size


def test_threshold_search_equals_the_direct_formula_on_many_channels():
    """search_threshold computes in place and shares channels among threads: the same lambda as
    the rate-coding error written out with ``quantised``, channel by channel."""
    from onnx_snn.calibration import search
    rng = np.random.default_rng(5)
    hist = StreamingHistogram(150, 4096)
    for _ in range(3):
        x = np.maximum(rng.standard_normal((4, 150, 6, 6)), 0) * rng.random((1, 150, 1, 1)) * 5
        x[:, 7] = 0  # a dead channel: lambda 0
        hist.update(x.astype(np.float32))
    for T, v_init in [(8, 0.5), (4, 0.0)]:
        expected = np.zeros(hist.channels)
        for c in np.flatnonzero(hist.max > 0):
            counts = hist.counts[c].reshape(search.SEARCH_BINS, -1).sum(axis=1).astype(np.float64)
            centres = np.minimum((np.arange(len(counts)) + 0.5) * hist.range[c] / len(counts), hist.max[c])
            lams = hist.max[c] * np.arange(1, 257) / 256
            a = centres[None, :]
            error = (counts[None, :] * (a - search.quantised(a, lams[:, None], T, v_init)) ** 2).sum(axis=1)
            expected[c] = lams[np.argmin(error)]
        np.testing.assert_array_equal(search.search_threshold(hist, T, v_init), expected)
        assert expected[7] == 0
