"""Simulation speed against SpikingJelly 2.0 on the same SNN, and whether both predict alike.

    python bench/vs_spikingjelly.py [--T 50] [--batches 1,100,1000] [--images 1000]
                                    [--batch1-images 50] [--threads 2] [--repeats 3]

The committed sample CNN is converted once by onnx-snn (mode 99.9%); SpikingJelly's SNN is
built from the same trained weights (BatchNorm folded by torch) with our lambda per layer:
each ReLU becomes VoltageScaler(1/lambda) -> IFNode(threshold 1, reset by subtraction) ->
VoltageScaler(lambda), as its ann2snn does. Both simulate the same maths, so their
predictions after every t should agree (up to float rounding at a threshold). Timings:
images x timesteps per second, best of ``--repeats``, the two simulators run alternately in
this one process with the same number of CPU threads. Needs ``bash scripts/setup_bench.sh``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

from onnx_snn_runtime import Simulator  # noqa: E402
from onnx_snn_runtime.datasets import load_fashion_mnist  # noqa: E402
from timing import add_timing_args, seconds, timed_images  # noqa: E402

import onnx_snn  # noqa: E402


def spikingjelly_snn(lambdas: list[float]):
    """The sample CNN in SpikingJelly: BatchNorm folded, every ReLU replaced by scaled IF neurons."""
    import torch
    from spikingjelly.activation_based import neuron
    from spikingjelly.activation_based.ann2snn.modules import VoltageScaler
    from zoo import load_trained
    layers, scales = [], iter(lambdas)
    modules = list(load_trained("sample_cnn").children())
    i = 0
    while i < len(modules):
        m = modules[i]
        if isinstance(m, torch.nn.Conv2d) and i + 1 < len(modules) and isinstance(modules[i + 1], torch.nn.BatchNorm2d):
            layers.append(torch.nn.utils.fusion.fuse_conv_bn_eval(m, modules[i + 1]))
            i += 2
            continue
        if isinstance(m, torch.nn.ReLU):
            lam = float(next(scales))
            layers += [VoltageScaler(1.0 / lam), neuron.IFNode(v_threshold=1.0, v_reset=None), VoltageScaler(lam)]
        else:
            layers.append(m)
        i += 1
    return torch.nn.Sequential(*layers).eval()


def spikingjelly_run(net, x: np.ndarray, T: int, batch: int) -> np.ndarray:
    """Predictions after every t, [T, N]."""
    import torch
    from spikingjelly.activation_based import functional
    preds = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            xb = torch.from_numpy(x[start:start + batch])
            functional.reset_net(net)
            total, steps = None, []
            for _ in range(T):
                out = net(xb)
                total = out if total is None else total + out
                steps.append(total.argmax(1).numpy())
            preds.append(np.stack(steps))
    return np.concatenate(preds, axis=1)


def ours_run(sim: Simulator, x: np.ndarray, T: int, batch: int) -> np.ndarray:
    return np.concatenate([sim.run(x[s:s + batch], T).argmax(-1) for s in range(0, len(x), batch)], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_timing_args(parser)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    x_train, _ = load_fashion_mnist("train")
    x_test, _ = load_fashion_mnist("test")
    converter = onnx_snn.Converter(x_train[:5000], "99.9%", progress=False)
    snn = converter(ROOT / "models" / "sample_cnn.onnx")
    ours = Simulator(snn.SerializeToString(), "cpu", threads=args.threads)
    theirs = spikingjelly_snn([e["lambda"] for e in converter.report])
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.threads} threads each; "
          f"onnxruntime {ort.__version__}, torch {torch.__version__}; sample CNN, 99.9%, T={args.T}")

    x = x_test[: args.images]
    a, b = ours_run(ours, x, args.T, 500), spikingjelly_run(theirs, x, args.T, 500)
    per_t = (a == b).mean(axis=1)
    print(f"same prediction on {len(x)} test images: share {per_t.min():.4f} at the worst t, {per_t[-1]:.4f} at "
          f"t={args.T}; {(a == b).all(axis=0).mean():.4f} of the images agree at every t")

    print(f"{'batch':>6} {'onnx-snn img*steps/s':>22} {'SpikingJelly':>14} {'ratio':>7}")
    for batch in map(int, args.batches.split(",")):
        xs = timed_images(x_test, batch, args)
        best = {"ours": 0.0, "sj": 0.0}
        for _ in range(args.repeats):
            for name, run in (("ours", lambda: ours_run(ours, xs, args.T, batch)),
                              ("sj", lambda: spikingjelly_run(theirs, xs, args.T, batch))):
                best[name] = max(best[name], len(xs) * args.T / seconds(run))
        print(f"{batch:6d} {best['ours']:22,.0f} {best['sj']:14,.0f} {best['ours'] / best['sj']:6.1f}x", flush=True)


if __name__ == "__main__":
    main()
