"""The runtime's Simulator: exact against a numpy simulation, streaming, batching, errors, CLI."""
import json

import numpy as np
import onnx
import pytest
from conftest import SAMPLE_ONNX
from helpers import run_ort
from onnx_builder import GraphBuilder
from onnx_snn_runtime import DataError, FormatError, OnnxSnnError, ProviderError, Simulator
from onnx_snn_runtime.providers import gpu_present

import onnx_snn
from onnx_snn.cli import main
from onnx_snn.ops.if_neuron import if_step


def dyadic(rng, shape, lo, hi, step):
    """Values k*step: every sum and product in the small net below is exact in float32, so numpy
    and onnxruntime must agree bit for bit whatever order they add in."""
    return (rng.integers(int(lo / step), int(hi / step) + 1, shape) * step).astype(np.float32)


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    rng = np.random.default_rng(5)
    w1, b1 = dyadic(rng, (2, 1, 3, 3), -1, 1, 0.25), dyadic(rng, (2,), -0.5, 0.5, 0.25)
    w2, b2 = dyadic(rng, (3, 8), -1, 1, 0.25), dyadic(rng, (3,), -0.5, 0.5, 0.25)
    w3 = dyadic(rng, (2, 3), -1, 1, 0.25)
    b = GraphBuilder()
    h = b.op("Relu", [b.op("Conv", ["x", b.const(w1), b.const(b1)])])
    h = b.op("Flatten", [b.op("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2])])
    h = b.op("Relu", [b.op("Gemm", [h, b.const(w2), b.const(b2)], transB=1)])
    y = b.op("Gemm", [h, b.const(w3)], transB=1)
    model = b.model({"x": ["N", 1, 6, 6]}, [y])
    x = dyadic(rng, (16, 1, 6, 6), 0, 1, 0.125)
    # scales not folded: the numpy restatement below keeps SpikingJelly's Mul(1/λ) -> IF -> Mul(λ)
    converter = onnx_snn.Converter(x, mode="max", progress=False, fold_scales=False)
    path = tmp_path_factory.mktemp("small") / "small.snn.onnx"
    onnx_snn.save(converter(model), path)
    lams = [np.float32(entry["lambda"]) for entry in converter.report]
    return path, x, (w1, b1, w2, b2, w3), lams, model


def numpy_snn(x, weights, lams, T):
    """The same SNN in plain numpy with the IF reference semantics: outputs summed and spikes per step."""
    w1, b1, w2, b2, w3 = weights
    win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
    z1 = np.einsum("nchwij,ocij->nohw", win, w1) + b1[None, :, None, None]
    v1 = np.zeros_like(z1)
    v2 = np.zeros((len(x), 3), np.float32)
    total, outs, spikes = 0, [], []
    inv = [np.float32(1.0 / np.float64(lam)) for lam in lams]
    for _ in range(T):
        s1, v1 = if_step(z1 * inv[0], v1)
        h = (s1 * lams[0]).reshape(len(x), 2, 2, 2, 2, 2).mean(axis=(3, 5)).reshape(len(x), -1)
        s2, v2 = if_step((h @ w2.T + b2) * inv[1], v2)
        total = total + (s2 * lams[1]) @ w3.T
        outs.append(total)
        spikes.append([s1.sum(axis=(1, 2, 3)), s2.sum(axis=1)])
    return np.stack(outs), spikes


@pytest.mark.parametrize("runtime_form", [True, False])
def test_run_equals_numpy_simulation_step_for_step(small_net, runtime_form):
    """Bit-exact with the graph run as written (no onnxruntime fusions)."""
    path, x, weights, lams, _ = small_net
    sim = Simulator(path, "cpu", runtime_form=runtime_form, optimize=False)
    out, counts = sim.run(x, 30, firing=True)
    expected, spikes = numpy_snn(x, weights, lams, 30)
    np.testing.assert_array_equal(out, expected)
    if runtime_form:
        for t in range(30):
            np.testing.assert_array_equal(counts["snn.v0"][t], spikes[t][0])
            np.testing.assert_array_equal(counts["snn.v1"][t], spikes[t][1])
        assert counts["snn.v0"].sum() > 0 and counts["snn.v1"].sum() > 0


def test_optimized_run_matches_numpy_up_to_last_bit_threshold_ties(small_net):
    """onnxruntime's fusions (Conv*Mul(1/λ) folded into the weights) round differently in the last bit:
    a neuron sitting exactly on its threshold may fire a step earlier or later. Predictions agree."""
    path, x, weights, lams, _ = small_net
    out = Simulator(path, "cpu").run(x, 30)
    expected, _ = numpy_snn(x, weights, lams, 30)
    assert (out.argmax(-1) == expected.argmax(-1)).mean() >= 0.95
    np.testing.assert_allclose(out[-1], expected[-1], atol=2 * np.abs(weights[4]).max() * lams[1])


def test_step_after_reset_equals_run(small_net):
    path, x, *_ = small_net
    sim = Simulator(path, "cpu")
    full = sim.run(x, 12)
    for _ in range(2):  # twice: reset really restores the initial state
        sim.reset()
        stepped = np.stack([sim.step(x) for _ in range(12)])
        np.testing.assert_array_equal(stepped, full)


def test_streaming_with_a_changing_input_equals_the_numpy_simulation_of_the_whole_graph(small_net):
    path, x, *_ = small_net
    sim = Simulator(path, "cpu")
    plain = Simulator(path, "cpu", runtime_form=False)
    for sim_ in (sim, plain):
        sim_.reset()
    for t in range(6):
        xt = np.roll(x, t, axis=0)  # a different input at each step: the prefix runs every step
        np.testing.assert_array_equal(sim.step(xt), plain.step(xt))


def test_constant_input_optimisation_changes_nothing_on_the_sample_cnn(bundled, tmp_path):
    xc, _, xt, _ = bundled
    path = onnx_snn.save(onnx_snn.Converter(xc[:256], mode="99.9%", progress=False)(SAMPLE_ONNX), tmp_path / "m.onnx")
    fast = Simulator(path, "cpu")
    slow = Simulator(path, "cpu", runtime_form=False)
    assert fast._engine.prefix is not None and slow._engine.prefix is None  # the prefix really is split off
    a, b = fast.run(xt[:64], 40), slow.run(xt[:64], 40)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    assert (a.argmax(-1) == b.argmax(-1)).mean() == 1.0


def test_state_does_not_leak_between_batches_and_partial_batches_count(small_net):
    path, x, *_ = small_net
    sim = Simulator(path, "cpu")
    first = sim.run(x[:8], 10)
    sim.run(x[8:], 10)
    np.testing.assert_array_equal(sim.run(x[:8], 10), first)
    labels = np.arange(16) % 2
    by_3 = sim.evaluate((x, labels), 10, batch_size=3, progress=False)  # 5 full batches and 1 of 1
    whole = sim.evaluate((x, labels), 10, batch_size=16, progress=False)
    assert by_3.samples == whole.samples == 16
    np.testing.assert_array_equal(by_3.accuracy, whole.accuracy)
    for layer in whole.firing_rates:
        np.testing.assert_allclose(by_3.firing_rates[layer], whole.firing_rates[layer], rtol=1e-12)


def test_sample_cnn_evaluate_reaches_ann_accuracy_at_T50(sample_snn, bundled):
    _, _, xt, yt = bundled
    ann = float(np.mean(run_ort(onnx.load(SAMPLE_ONNX), {"input": xt})[0].argmax(1) == yt))
    ev = Simulator(sample_snn, "cpu").evaluate((xt, yt), 50, progress=False)
    assert ev.accuracy[-1] >= ann - 0.010, (ev.accuracy[-1], ann)
    assert ev.accuracy[0] < ev.accuracy[-1]
    assert set(ev.firing_rates) == {"snn.v0", "snn.v1", "snn.v2"}
    assert all(0 < r.mean() < 1 for r in ev.firing_rates.values())


def test_cli_run_prints_accuracy_and_rates_and_writes_json_and_plot(sample_snn, bundled, tmp_path, capsys):
    _, _, xt, yt = bundled
    data = tmp_path / "test.npz"
    np.savez(data, x=(xt[:, 0] * 255).round().astype(np.uint8), y=yt)  # uint8 images without channel axis
    ann = float(np.mean(run_ort(onnx.load(SAMPLE_ONNX), {"input": xt})[0].argmax(1) == yt))
    rc = main(["run", str(sample_snn), "--data", str(data), "--T", "50", "--batch-size", "500",
               "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "acc.png"), "-q"])
    printed = capsys.readouterr().out
    assert rc == 0
    for t in (1, 2, 4, 8, 16, 32, 50):
        assert f"t={t:5d}" in printed
    assert "snn.v2" in printed and "firing rate" in printed
    result = json.loads((tmp_path / "out.json").read_text())
    assert len(result["accuracy"]) == 50 and result["samples"] == 2000
    assert result["accuracy"][-1] >= ann - 0.010
    assert (tmp_path / "acc.png").stat().st_size > 10_000


def test_datasets_in_every_form_give_the_same_accuracy(small_net, tmp_path):
    path, x, *_ = small_net
    sim = Simulator(path, "cpu")
    labels = (np.arange(16) * 7) % 2
    reference = sim.evaluate((x, labels), 8, progress=False).accuracy
    np.savez(tmp_path / "d.npz", x=x, y=labels)
    forms = [tmp_path / "d.npz", {"images": x, "labels": labels}, [(x[:10], labels[:10]), (x[10:], labels[10:])]]
    torch = pytest.importorskip("torch")
    forms.append(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x),
                                                                            torch.from_numpy(labels)), batch_size=5))
    for form in forms:
        np.testing.assert_array_equal(sim.evaluate(form, 8, progress=False).accuracy, reference)


def test_idx_folder_dataset(tmp_path, sample_snn, bundled):
    _, _, xt, yt = bundled
    images = (xt[:50, 0] * 255).round().astype(np.uint8)
    header = lambda magic, dims: bytes([0, 0, 8, magic]) + b"".join(int(d).to_bytes(4, "big") for d in dims)  # noqa: E731
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header(3, images.shape) + images.tobytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(header(1, [50]) + yt[:50].astype(np.uint8).tobytes())
    sim = Simulator(sample_snn, "cpu")
    a = sim.evaluate(tmp_path, 20, progress=False).accuracy
    b = sim.evaluate((xt[:50], yt[:50]), 20, progress=False).accuracy
    np.testing.assert_allclose(a, b, atol=1 / 50)  # uint8 rounding of the images may flip one sample


def test_errors_users_can_hit(small_net, tmp_path):
    path, x, _, _, ann = small_net
    with pytest.raises(FormatError, match="not an SNN step model"):
        Simulator(ann.SerializeToString())
    with pytest.raises(OnnxSnnError, match="does not exist"):
        Simulator(tmp_path / "missing.snn.onnx")
    sim = Simulator(path, "cpu")
    with pytest.raises(DataError, match=r"shape \(16, 1, 5, 6\)"):
        sim.run(x[:, :, :5], 5)
    with pytest.raises(DataError, match="dtype"):
        sim.run(np.array([["a"]]), 5)
    for bad_T in (0, -3, 2.5, True):
        with pytest.raises(OnnxSnnError, match="positive integer"):
            sim.run(x, bad_T)
    with pytest.raises(ProviderError, match="not supported"):
        Simulator(path, "tpu")
    sim.step(x[:4])
    with pytest.raises(DataError, match="reset"):
        sim.step(x[:5])


@pytest.mark.skipif(gpu_present(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(small_net):
    with pytest.raises(ProviderError, match="cpu"):
        Simulator(small_net[0], "cuda")


def test_labels_that_do_not_match_the_inputs_are_refused(small_net):
    path, x, *_ = small_net
    sim = Simulator(path, "cpu")
    with pytest.raises(DataError, match="class index per sample"):
        sim.evaluate([(x[:4], np.zeros(3))], 2, progress=False)
    with pytest.raises(DataError, match="class index per sample"):
        sim.evaluate((x, np.zeros((16, 10))), 2, progress=False)


def test_a_cpu_batch_larger_than_a_slice_gives_what_single_slices_give(small_net, monkeypatch):
    """run() simulates a large CPU batch slice by slice: the same outputs and spike counts."""
    import onnx_snn_runtime.simulator as simulator
    path, x, weights, lams, _ = small_net
    xs = np.concatenate([x] * (1 + 150 // len(x)))[:150]  # more than two slices of 64, the last partial
    sim = Simulator(path, "cpu", optimize=False)
    out, counts = sim.run(xs, 12, firing=True)
    monkeypatch.setattr(simulator, "CPU_SLICE", 1 << 20)  # the whole batch at once
    whole, whole_counts = sim.run(xs, 12, firing=True)
    assert out.shape == whole.shape == (12, 150, *whole.shape[2:])
    np.testing.assert_array_equal(out, whole)
    for layer in whole_counts:
        np.testing.assert_array_equal(counts[layer], whole_counts[layer])
    expected, _ = numpy_snn(xs, weights, lams, 12)
    np.testing.assert_array_equal(out, expected)


def test_a_failed_allocation_does_not_pin_the_batch_size(sample_snn, bundled, monkeypatch):
    """If the state buffers cannot be allocated (out of memory), the next run allocates afresh
    instead of padding every later batch to the failed size."""
    from onnx_snn_runtime import engine
    sim = Simulator(sample_snn, "cpu", execution="step")
    real = engine.Engine._ortvalue
    calls = {"n": 0}

    def failing(self, array):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("simulated out of memory")
        return real(self, array)

    monkeypatch.setattr(engine.Engine, "_ortvalue", failing)
    with pytest.raises(MemoryError):
        sim.run(bundled[2][:8], 2)
    assert sim._engine.batch is None
    out = sim.run(bundled[2][:3], 2)
    assert out.shape == (2, 3, 10)
