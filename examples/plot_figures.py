"""The seed tutorial's figures: an IF neuron beside ReLU, and a converted model's firing rates.

    python examples/plot_figures.py [--out DIR]
"""
import argparse
from pathlib import Path

from onnx_snn_runtime import Simulator
from onnx_snn_runtime.cli import plot_accuracy
from onnx_snn_runtime.datasets import load_fashion_mnist

import onnx_snn
from onnx_snn.plots import plot_firing_rates, plot_if_neuron

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="example_output")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    curves = plot_if_neuron(str(out / "if_neuron.png"), T=128)
    print(f"IF neuron: firing rate within {abs(curves.rates - curves.relu).max():.4f} of ReLU over 128 steps")

    x_train, _ = load_fashion_mnist("train", source="bundled")
    x_test, y_test = load_fashion_mnist("test", source="bundled")
    curves_by_mode = {}
    for mode in ("max", "99.9%"):
        snn = onnx_snn.Converter(x_train, mode, progress=False)(ROOT / "models" / "sample_cnn.onnx")
        ev = Simulator(snn.SerializeToString(), "cpu").evaluate((x_test[:300], y_test[:300]), 32, progress=False)
        curves_by_mode[mode] = ev.accuracy
    plot_accuracy(curves_by_mode, str(out / "accuracy.png"), "sample CNN as SNN (300 test images)")
    means = plot_firing_rates(ev.firing_rates, str(out / "firing_rates.png"), "sample CNN, 99.9%, T=32")
    print("mean firing rates (99.9%):", {k: round(v, 3) for k, v in means.items()})
    print(f"wrote {out / 'if_neuron.png'}, {out / 'accuracy.png'} and {out / 'firing_rates.png'}")


if __name__ == "__main__":
    main()
