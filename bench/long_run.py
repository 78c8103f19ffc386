"""Long streaming run: resident memory over T steps of ``Simulator.step`` (flat after warm-up?).

    python bench/long_run.py [--steps 100000] [--batch 1] [--every 10000] [--warmup 1000]

The sample CNN converted with 99.9% streams one test image per step, as a deployed SNN fed a
sensor would. Prints the resident set size (VmRSS) after the warm-up and every ``--every``
steps, then the growth after warm-up and the step rate. tests/test_reliability.py runs a short
version of the same loop and bounds the growth.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_snn_runtime import Simulator  # noqa: E402
from onnx_snn_runtime.datasets import load_fashion_mnist  # noqa: E402
from timing import status_mb  # noqa: E402

import onnx_snn  # noqa: E402


def stream(sim: Simulator, x: np.ndarray, steps: int, every: int, warmup: int, report=print) -> list[tuple[int, float]]:
    """Step ``steps`` times (input x[t % len(x)]); returns (step, RSS MB) samples from the warm-up on."""
    samples = []
    sim.reset()
    for t in range(1, steps + 1):
        sim.step(x[(t - 1) % len(x)][None])
        if t == warmup or (t > warmup and t % every == 0) or t == steps:
            samples.append((t, status_mb()))
            report(f"{t:9d} steps  RSS {samples[-1][1]:8.1f} MB")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    x_train, _ = load_fashion_mnist("train")
    x_test, _ = load_fashion_mnist("test")
    snn = onnx_snn.Converter(x_train[:2000], "99.9%", progress=False)(ROOT / "models" / "sample_cnn.onnx")
    sim = Simulator(snn.SerializeToString(), "cpu", threads=args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; sample CNN, 99.9%, streaming one image per step")
    start = time.perf_counter()
    samples = stream(sim, x_test[:100], args.steps, args.every, args.warmup)
    seconds = time.perf_counter() - start
    growth = samples[-1][1] - samples[0][1]
    print(f"RSS after warm-up {samples[0][1]:.1f} MB, at the end {samples[-1][1]:.1f} MB: growth {growth:+.1f} MB "
          f"over {args.steps - args.warmup} steps; {args.steps / seconds:,.0f} steps/s")


if __name__ == "__main__":
    main()
