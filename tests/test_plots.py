"""The seed tutorial's figures: the numbers behind them, and the CLI that writes them."""
import numpy as np
import pytest

from onnx_snn.cli import main
from onnx_snn.errors import OnnxSnnError
from onnx_snn.plots import if_neuron_curves, plot_firing_rates

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("T", [16, 128])
def test_if_neuron_rate_tracks_clipped_relu_within_one_spike(T):
    c = if_neuron_curves(T)
    # a constant input x in [0, 1] fires floor(T x) times from rest (up to float32 rounding at ties)
    assert np.all(np.abs(c.rates - c.relu) <= 1.0 / T + 1e-6)
    assert np.all(c.rates[c.inputs <= 0] == 0) and np.all(c.rates[c.inputs >= 1] == 1)
    counts = c.raster.sum(axis=1)
    assert np.all(np.abs(counts - np.floor(T * c.raster_inputs.astype(np.float64))) <= 1)
    half = if_neuron_curves(T, v_init=0.5)  # starting at half the threshold rounds instead of flooring
    assert np.abs(half.rates - half.relu).max() <= 0.5 / T + 1e-6 < np.abs(c.rates - c.relu).max()


def test_cli_writes_the_neuron_and_firing_rate_figures(sample_snn, tmp_path, capsys):
    out = tmp_path / "if.png"
    assert main(["plot", "neuron", "--T", "64", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    rates = tmp_path / "rates.png"
    assert main(["plot", "firing", str(sample_snn), "--T", "8", "--limit", "64", "-q", "-o", str(rates)]) == 0
    assert rates.read_bytes()[:8] == PNG
    text = capsys.readouterr().out
    assert text.count("spikes/neuron/step") == 3
    assert main(["plot", "firing"]) == 2  # a model is needed
    assert "needs a step model" in capsys.readouterr().err


def test_firing_rate_plot_returns_the_means_and_refuses_nothing(tmp_path):
    means = plot_firing_rates({"a": np.array([0.1, 0.3]), "b": np.array([0.0, 0.2])}, str(tmp_path / "r.png"))
    assert means == pytest.approx({"a": 0.2, "b": 0.1})
    with pytest.raises(OnnxSnnError, match="no firing rates"):
        plot_firing_rates({}, str(tmp_path / "x.png"))
