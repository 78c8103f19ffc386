"""``run`` command: simulate a step model over a dataset, print accuracy against t and firing rates.

Used by ``onnx-snn run`` and runnable alone as ``python -m onnx_snn_runtime run ...`` where only
the runtime is installed.
"""
from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from .errors import OnnxSnnError
from .simulator import Evaluation, Simulator, save_json


def format_evaluation(ev: Evaluation, reference: float | None = None) -> str:
    lines = [f"accuracy on {ev.samples} samples" + (f" (ANN: {reference:.4f})" if reference is not None else "")]
    for t in ev.checkpoints():
        lines.append(f"  t={t:5d}  {ev.accuracy[t - 1]:.4f}")
    if ev.firing_rates:
        lines.append("mean firing rate (spikes per neuron per step, over all t)")
        for layer, rates in ev.firing_rates.items():
            lines.append(f"  {layer:12s} {rates.mean():.4f}")
    return "\n".join(lines)


def plot_accuracy(curves: dict[str, np.ndarray], path: str, title: str, reference: float | None = None) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise OnnxSnnError("plotting needs matplotlib: pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, acc in curves.items():
        ax.plot(np.arange(1, len(acc) + 1), acc, label=label)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label="ANN")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="simulate a step model over a labelled dataset")
    r.add_argument("model", help="SNN step model (.snn.onnx)")
    r.add_argument("--data", default="fashion-mnist",
                   help="'fashion-mnist' (test split), an .npz with x and y, or a folder of IDX files")
    r.add_argument("--T", type=int, default=None, help="timesteps (default: the model's target T, else 50)")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    r.add_argument("--provider", default=None, help="cpu or cuda (default: cuda when usable)")
    r.add_argument("--no-cuda-graph", action="store_true", help="do not use CUDA graphs")
    r.add_argument("--json", default=None, help="write accuracy per t and firing rates as JSON")
    r.add_argument("--plot", default=None, help="write a plot of accuracy against t (PNG)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    sim = Simulator(args.model, args.provider, cuda_graph=False if args.no_cuda_graph else "auto")
    T = args.T if args.T is not None else int(sim.spec.converter.get("target_T") or 50)
    print(f"provider: {sim.provider}; CUDA graphs {sim.cuda_graph_status}")
    ev = sim.evaluate(args.data, T, batch_size=args.batch_size, limit=args.limit, progress=not args.quiet)
    print(format_evaluation(ev))
    if args.json:
        save_json(ev, args.json, model=str(args.model), provider=sim.provider)
        print(f"wrote {args.json}")
    if args.plot:
        plot_accuracy({"SNN": ev.accuracy}, args.plot, f"{args.model} (T={T})")
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onnx_snn_runtime")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return args.func(args)
    except OnnxSnnError as e:
        print(f"onnx-snn: error: {e}", file=sys.stderr)
        return 2
