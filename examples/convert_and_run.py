"""Convert the sample CNN to an SNN, look inside it, and simulate it: the whole path in the API.

    python examples/convert_and_run.py [--out DIR] [--T 32] [--images 500]
"""
import argparse
from pathlib import Path

import numpy as np
from onnx_snn_runtime import Simulator
from onnx_snn_runtime.datasets import load_fashion_mnist

import onnx_snn
from onnx_snn.inspect import format_report, inspect

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="example_output")
    parser.add_argument("--T", type=int, default=32)
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x_train, _ = load_fashion_mnist("train", source="bundled")  # 1000 bundled calibration images
    x_test, y_test = load_fashion_mnist("test", source="bundled")
    ann = ROOT / "models" / "sample_cnn.onnx"
    print(format_report(inspect(ann)).splitlines()[0])          # what the converter will do

    converter = onnx_snn.Converter(x_train, target_T=args.T, progress=False)  # the preset for T steps
    snn = converter(ann)
    path = onnx_snn.save(snn, out / "sample_cnn.snn.onnx")
    print(f"wrote {path}; scales per layer:", [round(float(np.mean(e["lambda"])), 3) for e in converter.report])

    sim = Simulator(path, "cpu")
    ev = sim.evaluate((x_test[:args.images], y_test[:args.images]), args.T, progress=False)
    print(f"accuracy after t = 1, {args.T // 2}, {args.T}: {ev.accuracy[0]:.3f}, "
          f"{ev.accuracy[args.T // 2 - 1]:.3f}, {ev.accuracy[-1]:.3f} on {ev.samples} images")


if __name__ == "__main__":
    main()
