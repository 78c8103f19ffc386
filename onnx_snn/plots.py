"""The seed tutorial's figures: an IF neuron against ReLU, and per-layer firing rates.

Each function computes its data, writes a PNG (matplotlib, Agg) and returns the data, so what a
figure shows is also what a test checks. Accuracy against t for several modes is
``onnx_snn_runtime.cli.plot_accuracy`` (``onnx-snn demo``, ``onnx-snn run --plot``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import OnnxSnnError
from .ops.if_neuron import if_step


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise OnnxSnnError("plotting needs matplotlib: pip install matplotlib") from e
    return plt


@dataclass
class NeuronCurves:
    raster_inputs: np.ndarray   # [k] constant inputs shown in the raster
    raster: np.ndarray          # [k, T] spikes (0/1)
    inputs: np.ndarray          # [m] constant inputs of the rate curve
    rates: np.ndarray           # [m] spikes per step over T steps
    relu: np.ndarray            # [m] ReLU(x) clipped to [0, threshold]: what the rate approximates


def if_neuron_curves(T: int = 128, v_init: float = 0.0, raster_inputs=None, inputs=None) -> NeuronCurves:
    """Spike trains and firing rates of one IF neuron (threshold 1, reset by subtraction) fed a
    constant input for T steps, with the numpy reference semantics of ``onnx_snn.IFNeuron``."""
    if isinstance(T, bool) or not isinstance(T, int) or T <= 0:
        raise OnnxSnnError(f"T={T!r} must be a positive integer")
    raster_inputs = np.asarray([0.05, 0.1, 0.25, 0.33, 0.5, 0.75, 0.9, 1.0] if raster_inputs is None
                               else raster_inputs, np.float32)
    inputs = np.asarray(np.linspace(-0.25, 1.5, 176) if inputs is None else inputs, np.float32)

    def run(x):
        v = np.full_like(x, np.float32(v_init))
        spikes = []
        for _ in range(T):
            s, v = if_step(x, v)
            spikes.append(s)
        return np.stack(spikes, axis=-1)

    return NeuronCurves(raster_inputs, run(raster_inputs), inputs, run(inputs).mean(axis=-1),
                        np.clip(inputs, 0.0, 1.0))


def plot_if_neuron(path: str, T: int = 128, v_init: float = 0.0) -> NeuronCurves:
    """Left: spike raster for a few constant inputs. Right: firing rate against input, beside ReLU."""
    c = if_neuron_curves(T, v_init)
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, _ in enumerate(c.raster_inputs):
        t = np.flatnonzero(c.raster[i]) + 1
        left.vlines(t, i + 0.6, i + 1.4, linewidth=0.8)
    left.set_yticks(np.arange(1, len(c.raster_inputs) + 1), [f"{x:g}" for x in c.raster_inputs])
    left.set_xlabel("timestep t")
    left.set_ylabel("constant input x")
    left.set_title(f"IF neuron spikes (threshold 1, T={T})")
    right.plot(c.inputs, c.relu, color="gray", linestyle="--", label="ReLU(x) clipped to [0, 1]")
    right.plot(c.inputs, c.rates, label=f"IF firing rate over {T} steps")
    right.set_xlabel("constant input x")
    right.set_ylabel("output")
    right.set_title("rate coding: firing rate tracks ReLU")
    right.grid(alpha=0.3)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return c


def plot_firing_rates(firing_rates: dict[str, np.ndarray], path: str, title: str = "firing rates") -> dict[str, float]:
    """Left: each neuron layer's mean firing rate (spikes per neuron per step) over all t. Right:
    the rate at each t. ``firing_rates`` is ``Evaluation.firing_rates``. Returns the means."""
    if not firing_rates:
        raise OnnxSnnError("no firing rates to plot: the step model has no runtime form (convert it with onnx-snn)")
    means = {layer: float(np.mean(r)) for layer, r in firing_rates.items()}
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(means)
    left.bar(range(len(names)), [means[n] for n in names])
    left.set_xticks(range(len(names)), names, rotation=45, ha="right")
    left.set_ylabel("spikes per neuron per step")
    left.set_title("mean firing rate per layer")
    for layer, rates in firing_rates.items():
        right.plot(np.arange(1, len(rates) + 1), rates, label=layer)
    right.set_xlabel("timestep t")
    right.set_ylabel("spikes per neuron")
    right.set_title("firing rate at each step")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return means
