"""Conversion recipes side by side: SNN accuracy at several T for each recipe on one model.

    python bench/recipes.py [--model sample_cnn] [--images 2000] [--calib 5000] [--target-T 8] [--T 32]
                            [--data bundled|auto]

Prints the machine, the data and, per recipe, accuracy at t = 4, 8, 16, ... T beside the ANN's.
"""
import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx_snn_runtime import Simulator
from onnx_snn_runtime.datasets import load_fashion_mnist

import onnx_snn

ROOT = Path(__file__).resolve().parents[1]


def recipes(target_T: int) -> dict[str, dict]:
    corrected = dict(mode="search", target_T=target_T, v_init="half")
    return {
        "99.9%": dict(mode="99.9%"),
        "99.9%, v_init half": dict(mode="99.9%", v_init="half"),
        f"search(T={target_T}), half": corrected,
        f"search(T={target_T}), half, bias corr.": dict(corrected, bias_correction=True),
        f"search(T={target_T}), half, bias+potential": dict(corrected, bias_correction=True, potential_correction=True),
        "99.9%, spike-count readout": dict(mode="99.9%", output_decoding="spikes"),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sample_cnn")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--calib", type=int, default=5000)
    parser.add_argument("--target-T", type=int, default=8)
    parser.add_argument("--T", type=int, default=32)
    parser.add_argument("--data", choices=("bundled", "auto"), default="bundled",
                        help="test images from the bundled slice (default) or the full set when installed")
    args = parser.parse_args()
    source = ROOT / "models" / f"{args.model}.onnx"
    x_train, _ = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test", source=args.data)
    x_calib, x_test, y_test = x_train[: args.calib], x_test[: args.images], y_test[: args.images]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; onnxruntime {ort.__version__}")
    print(f"model {args.model}; {len(x_calib)} calibration images; {len(x_test)} test images ({args.data})")
    ann = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    ann_acc = np.mean(ann.run(None, {"input": x_test})[0].argmax(1) == y_test)
    ts = [t for t in (4, 8, 16, 32, 64, 128) if t <= args.T]
    print(f"{'recipe':42s} " + " ".join(f"T={t:<5d}" for t in ts) + "  seconds")
    for label, options in recipes(args.target_T).items():
        start = time.perf_counter()
        snn = onnx_snn.Converter(x_calib, progress=False, **options)(source)
        ev = Simulator(snn.SerializeToString(), "cpu").evaluate((x_test, y_test), args.T, batch_size=250,
                                                               progress=False)
        print(f"{label:42s} " + " ".join(f"{ev.accuracy[t - 1]:.4f} " for t in ts)
              + f" {time.perf_counter() - start:7.1f}", flush=True)
    print(f"{'ANN':42s} {ann_acc:.4f}")


if __name__ == "__main__":
    main()
