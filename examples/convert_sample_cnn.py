"""Demo: convert the committed sample CNN to an SNN and watch its accuracy grow with time.

    python examples/convert_sample_cnn.py [--mode 99.9%] [--T 50] [--plot accuracy.png]

Calibrates on the Fashion-MNIST training set (the full set when the Debian package
dataset-fashion-mnist is installed, else the bundled 1000-image slice), writes
sample_cnn.snn.onnx, simulates it with a plain onnxruntime loop and prints the SNN's test
accuracy at t = 1, 2, 4, ..., T beside the ANN's.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnx_snn
from onnx_snn_runtime.datasets import load_fashion_mnist
from onnx_snn_runtime.loop import simulate

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="99.9%")
    parser.add_argument("--T", type=int, default=50)
    parser.add_argument("--calib-samples", type=int, default=10000)
    parser.add_argument("--output", default="sample_cnn.snn.onnx")
    parser.add_argument("--plot", default=None, help="write a plot of accuracy against t (needs matplotlib)")
    args = parser.parse_args()

    x_train, _ = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    print(f"calibration: {min(len(x_train), args.calib_samples)} training images; test: {len(x_test)} images")

    start = time.perf_counter()
    converter = onnx_snn.Converter(x_train[: args.calib_samples], mode=args.mode)
    snn = converter(ROOT / "models" / "sample_cnn.onnx")
    onnx_snn.save(snn, args.output)
    print(f"converted in {time.perf_counter() - start:.1f} s -> {args.output}")
    for entry in converter.report:
        print(f"  {entry['node']:10s} lambda = {entry['lambda']:.4g} (max {entry['max']:.4g})")

    ann = ort.InferenceSession(str(ROOT / "models" / "sample_cnn.onnx"), providers=["CPUExecutionProvider"])
    ann_acc = np.mean(ann.run(None, {"input": x_test})[0].argmax(1) == y_test)
    sess = ort.InferenceSession(args.output, providers=["CPUExecutionProvider"])
    correct = np.zeros(args.T)
    start = time.perf_counter()
    for i in range(0, len(x_test), 1000):
        logits = simulate(sess, {"input": x_test[i:i + 1000]}, args.T)["logits"]
        correct += (logits.argmax(-1) == y_test[i:i + 1000]).sum(axis=1)
    acc = correct / len(x_test)
    print(f"simulated T={args.T} in {time.perf_counter() - start:.1f} s")
    print(f"ANN accuracy: {ann_acc:.4f}")
    t = 1
    while t <= args.T:
        print(f"  SNN t={t:4d}: {acc[t - 1]:.4f}")
        t = t * 2 if t * 2 <= args.T or t == args.T else args.T
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(np.arange(1, args.T + 1), acc, label=f"SNN ({args.mode})")
        ax.axhline(ann_acc, color="gray", linestyle="--", label="ANN")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("test accuracy")
        ax.set_title("Sample CNN on Fashion-MNIST")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
