"""``run`` (simulate a step model over a dataset, print accuracy against t and firing rates)
and ``serve`` (Triton Inference Server through PyTriton) commands.

Used by ``onnx-snn run|serve`` and runnable alone as ``python -m onnx_snn_runtime run|serve ...``
where only the runtime is installed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

from .data import labelled_source
from .errors import OnnxSnnError
from .simulator import EXECUTIONS, KERNELS, Evaluation, Simulator, save_json


def format_evaluation(ev: Evaluation, reference: float | None = None) -> str:
    lines = [f"accuracy on {ev.samples} samples" + (f" (ANN: {reference:.4f})" if reference is not None else "")]
    for t in ev.checkpoints():
        lines.append(f"  t={t:5d}  {ev.accuracy[t - 1]:.4f}")
    if ev.firing_rates:
        lines.append("mean firing rate (spikes per neuron per step, over all t)")
        for layer, rates in ev.firing_rates.items():
            lines.append(f"  {layer:12s} {rates.mean():.4f}")
    return "\n".join(lines)


def ann_accuracy(ann, data, limit: int | None = None, batch_size: int = 256) -> float:
    """Accuracy of an ANN (.onnx, run by onnxruntime on the CPU) on the samples ``run`` evaluates:
    the reference the SNN's accuracy against t approaches."""
    from .data import labelled_batches, prepare
    from .engine import np_type
    from .providers import session as make_session
    try:
        sess = make_session(str(ann), "CPUExecutionProvider")
    except Exception as e:  # noqa: BLE001 - onnxruntime's own message says what is wrong
        raise OnnxSnnError(f"--ann {ann}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from e
    inp = sess.get_inputs()[0]
    batches, _ = labelled_batches(data, batch_size, limit)
    correct = total = 0
    for x, y in batches:
        out = sess.run(None, {inp.name: prepare(x, list(inp.shape), np_type(inp.type), inp.name)})[0]
        correct += int((out.reshape(len(out), -1).argmax(1) == np.asarray(y)).sum())
        total += len(y)
    return correct / max(total, 1)


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
                   help="'fashion-mnist' (test split), an .npz with x and y (or file.npz:ARRAY, labels "
                        "y_SUFFIX for x_SUFFIX, else y or labels), or a folder of IDX files")
    r.add_argument("--T", type=int, default=None, help="timesteps (default: the model's target T, else 50)")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    r.add_argument("--provider", default=None, help="cpu or cuda (default: cuda when usable)")
    r.add_argument("--no-cuda-graph", action="store_true", help="do not use CUDA graphs")
    r.add_argument("--execution", choices=EXECUTIONS, default="auto",
                   help="chunk: K steps per onnxruntime call; step: one (default auto: the fastest available)")
    r.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="native: the kernel library; onnx: the model's function bodies (default auto)")
    r.add_argument("--json", default=None, help="write accuracy per t and firing rates as JSON")
    r.add_argument("--plot", default=None, help="write a plot of accuracy against t (PNG)")
    r.add_argument("--ann", default=None, help="the ANN (.onnx) the model was converted from: its accuracy on "
                   "the same samples is printed beside the SNN's and drawn on the plot")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no line naming the data")
    r.set_defaults(func=cmd_run)


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a step model through Triton Inference Server (PyTriton), "
                       "HTTP and gRPC; needs the serve extra")
    s.add_argument("model", help="SNN step model (.snn.onnx)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002,
                   help="Prometheus metrics port (default 8002; 0 turns metrics off)")
    s.add_argument("--name", default="snn", help="model name: NAME (whole inference) and NAME_stream")
    s.add_argument("--provider", default="cpu", help="cpu or cuda (default cpu)")
    s.add_argument("--instances", type=int, default=2,
                   help="model instances, so that a small request is not queued behind a long one "
                        "(default 2)")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads of each instance (default: the cores shared out between the instances)")
    s.add_argument("--max-sequences", type=int, default=64, help="live streaming sequences at most (default 64)")
    s.add_argument("--idle-timeout", type=float, default=60.0,
                   help="seconds after which an idle streaming sequence is dropped (default 60)")
    s.add_argument("--max-T", type=int, default=1000, help="largest T of a whole-inference request (default 1000)")
    s.add_argument("--max-batch", type=int, default=256,
                   help="largest batch of one request (default 256); with --max-sequences it bounds memory")
    s.add_argument("--triton-log", action="store_true", help="show Triton's and PyTriton's own log")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    def ready():
        metrics = f", metrics {args.metrics_port}" if args.metrics_port else ", metrics off"
        print(f"serving {args.model} as '{args.name}' and '{args.name}_stream' on {args.host}: "
              f"HTTP {args.http_port}, gRPC {args.grpc_port}{metrics} (Ctrl-C or SIGTERM stops)", flush=True)

    serve(args.model, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
          metrics_port=args.metrics_port, name=args.name, provider=args.provider,
          max_sequences=args.max_sequences, idle_timeout=args.idle_timeout, max_T=args.max_T,
          max_batch=args.max_batch, instances=args.instances, threads=args.threads, ready=ready, verbose=args.triton_log)
    print("stopped", flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    sim = Simulator(args.model, args.provider, cuda_graph=False if args.no_cuda_graph else "auto",
                    execution=args.execution, kernels=args.kernels)
    T = args.T if args.T is not None else int(sim.spec.converter.get("target_T") or 50)
    data, description = labelled_source(args.data, args.limit)  # read once, said before the long run
    if not args.quiet:
        print(description)
    print(f"provider: {sim.provider}; {sim.execution} execution, {sim.kernels} kernels; "
          f"CUDA graphs {sim.cuda_graph_status}")
    ev = sim.evaluate(data, T, batch_size=args.batch_size, progress=not args.quiet)
    reference = ann_accuracy(args.ann, data, batch_size=args.batch_size) if args.ann else None
    print(format_evaluation(ev, reference))
    if args.json:
        save_json(ev, args.json, model=str(args.model), provider=sim.provider)
        print(f"wrote {args.json}")
    if args.plot:
        plot_accuracy({"SNN": ev.accuracy}, args.plot, f"{args.model} (T={T})", reference)
        print(f"wrote {args.plot}")
    return 0


def add_info_parser(sub) -> None:
    i = sub.add_parser("info", help="onnxruntime's version and providers, and whether the native kernels are built")
    i.set_defaults(func=cmd_info)


def info_lines() -> list[str]:
    import onnxruntime as ort

    from . import native
    from . import providers as prov
    library, loaded, status = native.library(), False, ""
    if library is not None:
        try:
            native.register(ort.SessionOptions())
            loaded, status = True, ", loads"
        except native.KernelsError as e:
            status = f", does NOT load: {e}"
    gpu = "" if prov.gpu_present() else " (no GPU device found)"
    cpu = "chunk execution, " + ("native kernels" if loaded else "the models' function bodies (no native kernels)")
    return [f"onnxruntime {ort.__version__}",
            f"providers: {', '.join(ort.get_available_providers())}{gpu}",
            f"native kernels: {library}{status}" if library else
            f"native kernels: not built ({native.BUILD_HINT})",
            f"CPU default: {cpu}"]


def cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onnx_snn_runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    add_serve_parser(sub)
    add_info_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return args.func(args)
    except OnnxSnnError as e:
        print(f"onnx-snn: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return quiet_broken_pipe()


def quiet_broken_pipe() -> int:
    """The reader of our output went away (``onnx-snn run ... | head``): stop without a traceback,
    and keep Python's flush at exit from raising again (as the Python docs advise)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1
