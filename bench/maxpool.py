"""MaxPool strategies measured on models/maxpool_cnn.onnx: SNN accuracy at several T for each.

    python bench/maxpool.py [--images 2000] [--T 64] [--mode 99.9%]

Prints the machine, the data used, and accuracy at t = 4, 8, 16, 32, 64 for the strategies
running_max (default), before_neuron and plain, beside the ANN.
"""
import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx_snn_runtime import Simulator
from onnx_snn_runtime.datasets import DEBIAN_DIR, load_fashion_mnist, read_idx_dir

import onnx_snn
from onnx_snn.passes.maxpool import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--mode", default="99.9%")
    parser.add_argument("--calib-samples", type=int, default=10000)
    args = parser.parse_args()
    source = ROOT / "models" / "maxpool_cnn.onnx"
    full = read_idx_dir(DEBIAN_DIR, "test") is not None
    x_train, _ = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    x_test, y_test = x_test[: args.images], y_test[: args.images]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; onnxruntime {ort.__version__}")
    print(f"data: {'full Fashion-MNIST' if full else 'bundled subset'}; {min(args.calib_samples, len(x_train))} "
          f"calibration images, {len(x_test)} test images; mode {args.mode}")
    ann = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    ann_acc = np.mean(ann.run(None, {"input": x_test})[0].argmax(1) == y_test)
    ts = [t for t in (4, 8, 16, 32, 64, 128, 256) if t <= args.T]
    print(f"{'strategy':14s} " + " ".join(f"T={t:<5d}" for t in ts) + "  seconds")
    for strategy in STRATEGIES:
        start = time.perf_counter()
        snn = onnx_snn.Converter(x_train[: args.calib_samples], args.mode, maxpool=strategy, progress=False)(source)
        path = Path(tempfile.mkdtemp()) / "m.snn.onnx"
        onnx_snn.save(snn, path)
        ev = Simulator(path, "cpu").evaluate((x_test, y_test), args.T, batch_size=500, progress=False)
        print(f"{strategy:14s} " + " ".join(f"{ev.accuracy[t - 1]:.4f} " for t in ts)
              + f" {time.perf_counter() - start:7.1f}")
    print(f"{'ANN':14s} {ann_acc:.4f}")


if __name__ == "__main__":
    main()
