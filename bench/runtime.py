"""Runtime benchmark: per-timestep latency at batch 1 and throughput at batch 1024, on every
usable provider, with and without CUDA graphs. Prints the machine and the figures.

    python bench/runtime.py [--T 50] [--repeats 3]
"""
import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx_snn_runtime import ProviderError, Simulator
from onnx_snn_runtime.datasets import load_fashion_mnist
from onnx_snn_runtime.providers import gpu_present

import onnx_snn

ROOT = Path(__file__).resolve().parents[1]


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}; "
          f"onnxruntime {ort.__version__}")
    x_train, _ = load_fashion_mnist("train")
    x_test, _ = load_fashion_mnist("test")
    path = Path(tempfile.mkdtemp()) / "sample_cnn.snn.onnx"
    snn = onnx_snn.Converter(x_train[:2000], mode="99.9%", progress=False)(ROOT / "models" / "sample_cnn.onnx")
    onnx_snn.save(snn, path)
    configs = [("cpu", False)]
    if gpu_present():
        configs += [("cuda", False), ("cuda", True)]
    big = np.concatenate([x_test] * (1024 // len(x_test) + 1))[:1024]
    for provider, graph in configs:
        try:
            sim = Simulator(path, provider, cuda_graph=graph)
        except ProviderError as e:
            print(f"{provider}: unavailable ({e})")
            continue
        one = x_test[:1]
        sim.run(one, 5, per_step=False)  # warm-up (and CUDA graph capture)
        latency = best_of(lambda: sim.run(one, args.T, per_step=False), args.repeats) / args.T
        sim.run(big, 2, per_step=False)
        seconds = best_of(lambda: sim.run(big, args.T, per_step=False), args.repeats)
        print(f"{sim.provider:22s} CUDA graphs {sim.cuda_graph_status:14s} "
              f"batch 1: {latency * 1e6:9.1f} us/timestep   batch 1024: {1024 * args.T / seconds:12.0f} images*steps/s")


if __name__ == "__main__":
    main()
