"""Simulation speed against SpikingJelly 2.0 on the same SNN, and whether both predict alike.

    python bench/vs_spikingjelly.py [--T 50] [--batches 1,100,1000] [--images 1000]
                                    [--batch1-images 50] [--threads 2] [--repeats 3]
                                    [--sj-modes s,m] [--execution ...] [--kernels ...]

The committed sample CNN is converted once by onnx-snn (mode 99.9%); SpikingJelly's SNN is
built from the same trained weights (BatchNorm folded by torch) with our lambda per layer:
each ReLU becomes VoltageScaler(1/lambda) -> IFNode(threshold 1, reset by subtraction) ->
VoltageScaler(lambda), as its ann2snn does. Both simulate the same maths, so their
predictions after every t should agree (up to float rounding at a threshold). Timings:
images x timesteps per second, best of ``--repeats``, the two simulators run alternately in
this one process with the same number of CPU threads. SpikingJelly runs in its single-step
mode (``s``: the network called once per step) and, with ``--sj-modes s,m``, also in its
multi-step mode (``m``: every stateless layer on all T*N images at once, the IF neuron looping
over T inside; memory grows with T*N). Needs ``bash scripts/setup_bench.sh``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import date
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


def spikingjelly_snn(lambdas: list[float], step_mode: str = "s"):
    """The sample CNN in SpikingJelly: BatchNorm folded, every ReLU replaced by scaled IF neurons.
    In multi-step mode each stateless layer is wrapped to run on the T*N images at once."""
    import torch
    from spikingjelly.activation_based import functional, layer, neuron
    from spikingjelly.activation_based.ann2snn.modules import VoltageScaler
    from zoo import load_trained
    layers, scales = [], iter(lambdas)
    modules = list(load_trained("sample_cnn").children())
    i = 0
    while i < len(modules):
        m = modules[i]
        stateless = (lambda mod: layer.SeqToANNContainer(mod)) if step_mode == "m" else (lambda mod: mod)
        if isinstance(m, torch.nn.Conv2d) and i + 1 < len(modules) and isinstance(modules[i + 1], torch.nn.BatchNorm2d):
            layers.append(stateless(torch.nn.utils.fusion.fuse_conv_bn_eval(m, modules[i + 1])))
            i += 2
            continue
        if isinstance(m, torch.nn.ReLU):
            lam = float(next(scales))
            layers += [VoltageScaler(1.0 / lam), neuron.IFNode(v_threshold=1.0, v_reset=None), VoltageScaler(lam)]
        else:
            layers.append(stateless(m))
        i += 1
    net = torch.nn.Sequential(*layers).eval()
    functional.set_step_mode(net, step_mode)
    return net


def spikingjelly_run_multistep(net, x: np.ndarray, T: int, batch: int) -> np.ndarray:
    """Predictions after every t, [T, N], from SpikingJelly's multi-step mode: one call per batch."""
    import torch
    from spikingjelly.activation_based import functional
    preds = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            xb = torch.from_numpy(x[start:start + batch])
            functional.reset_net(net)
            out = net(xb.unsqueeze(0).repeat(T, *([1] * xb.dim())))  # [T, N, 10]
            preds.append(out.cumsum(0).argmax(-1).numpy())
    return np.concatenate(preds, axis=1)


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
    parser.add_argument("--sj-modes", default="s", help="SpikingJelly step modes to time: s, m or s,m")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    x_train, _ = load_fashion_mnist("train")
    x_test, _ = load_fashion_mnist("test")
    converter = onnx_snn.Converter(x_train[:5000], "99.9%", progress=False)
    snn = converter(ROOT / "models" / "sample_cnn.onnx")
    ours = Simulator(snn.SerializeToString(), "cpu", threads=args.threads, execution=args.execution,
                     kernels=args.kernels)
    lambdas = [e["lambda"] for e in converter.report]
    modes = args.sj_modes.split(",")
    runners = {"s": spikingjelly_run, "m": spikingjelly_run_multistep}
    theirs = {mode: spikingjelly_snn(lambdas, mode) for mode in modes}
    print(f"{date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.threads} threads each; "
          f"onnxruntime {ort.__version__}, torch {torch.__version__}; sample CNN, 99.9%, T={args.T}; "
          f"onnx-snn: {ours.execution} execution, {ours.kernels} kernels")

    x = x_test[: args.images]
    a = ours_run(ours, x, args.T, 500)
    for mode in modes:
        b = runners[mode](theirs[mode], x, args.T, 500 if mode == "s" else 50)
        per_t = (a == b).mean(axis=1)
        print(f"SpikingJelly ({mode}): same prediction on {len(x)} test images: share {per_t.min():.4f} at the "
              f"worst t, {per_t[-1]:.4f} at t={args.T}; {(a == b).all(axis=0).mean():.4f} of the images agree at every t")

    print(f"{'batch':>6} {'onnx-snn img*steps/s':>22}" + "".join(f" {'SJ (' + m + ')':>12} {'ratio':>7}" for m in modes))
    for batch in map(int, args.batches.split(",")):
        xs = timed_images(x_test, batch, args)
        best = {"ours": 0.0, **{m: 0.0 for m in modes}}
        for _ in range(args.repeats):
            runs = [("ours", lambda: ours_run(ours, xs, args.T, batch))]
            runs += [(m, lambda m=m: runners[m](theirs[m], xs, args.T, batch)) for m in modes]
            for name, run in runs:
                best[name] = max(best[name], len(xs) * args.T / seconds(run))
        print(f"{batch:6d} {best['ours']:22,.0f}" + "".join(
            f" {best[m]:12,.0f} {best['ours'] / best[m]:6.1f}x" for m in modes), flush=True)


if __name__ == "__main__":
    main()
