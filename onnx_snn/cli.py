"""``onnx-snn`` command line: ``convert`` (an ANN into a step model), ``run`` (simulate it),
``inspect``, ``plot``, ``serve`` (Triton through PyTriton), ``export-triton`` (a Triton model repository entry), ``demo``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .calibration.mode import parse_mode
from .calibration.data import load_npz
from .converter import Converter
from .errors import DataError, OnnxSnnError, OptionError
from .io import save
from .passes.maxpool import STRATEGIES
from onnx_snn_runtime.cli import add_parser as add_run_parser, add_serve_parser

log = logging.getLogger("onnx_snn")


def _calibration_data(spec: str, limit: int | None):
    """An .npz path, or ``fashion-mnist`` (the training split: full set if installed, else bundled)."""
    if spec.lower() in ("fashion-mnist", "fashion_mnist", "fmnist"):
        from onnx_snn_runtime.datasets import load_fashion_mnist
        x, _ = load_fashion_mnist("train")
        return x[:limit] if limit else x
    if limit:
        if not Path(spec).is_file():
            raise DataError(f"calibration file {spec} does not exist")
        return load_npz(Path(spec))[:limit]
    return spec


def format_table(layers: list[dict]) -> str:
    rows = [("#", "node", "op", "lambda", "max", "above lambda")]
    for i, entry in enumerate(layers):
        lam = np.asarray(entry["lambda"])
        shown = f"{float(lam):.4g}" if lam.ndim == 0 else f"{lam.min():.3g}..{lam.max():.3g} ({lam.size} ch)"
        rows.append((str(i), entry["node"], entry["op"], shown, f"{entry['max']:.4g}",
                     f"{100 * entry['share_above']:.3f}%"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.output) if args.output else Path(args.model).with_suffix(".snn.onnx")
    if out.resolve() == Path(args.model).resolve() and not args.force:
        raise OptionError(f"output {out} is the input model; choose another -o or pass --force")
    mode = None if args.mode is None else parse_mode(args.mode)  # refuse a bad mode before loading data
    try:
        v_init = args.v_init if args.v_init in (None, "half") else float(args.v_init)
    except ValueError:
        raise OptionError(f"--v-init {args.v_init!r}: give a number (in thresholds) or 'half'") from None
    converter = Converter(_calibration_data(args.calib, args.limit), mode, fuse_flag=not args.no_fuse,
                          v_init=v_init, target_T=args.target_T, bias_correction=args.bias_correction,
                          potential_correction=args.potential_correction, output_decoding=args.output_decoding,
                          fold_scales=not args.no_fold_scales,
                          per_channel=args.per_channel, maxpool=args.maxpool, reset_mode=args.reset,
                          batch_size=args.batch_size, bins=args.bins, progress=not args.quiet)
    snn = converter(args.model)
    save(snn, out)
    if not args.quiet:
        print(format_table(converter.report))
        recipe = f"preset for T={args.target_T}: " if converter.preset else ""
        options = converter.options()
        recipe += f"mode {converter.mode}" + "".join(
            f", {name}" for name in ("per_channel", "bias_correction", "potential_correction") if options[name])
        recipe += f", v_init {options['v_init']:g}" if options["v_init"] else ""
        print(f"\nwrote {out} ({len(converter.report)} neuron layers; {recipe})")
    return 0


DEMO_MODES = ("max", "99.9%", "1/2", "1/3", "1/4", "1/5")  # the seed tutorial's six modes


def cmd_plot(args: argparse.Namespace) -> int:
    from . import plots
    if args.T is not None and args.T <= 0:
        raise OptionError(f"--T {args.T}: the number of timesteps must be a positive integer")
    if args.figure == "neuron":
        out = args.output or "if_neuron.png"
        T = args.T or 128
        c = plots.plot_if_neuron(out, T=T, v_init=args.v_init)
        err = np.abs(c.rates - c.relu).max()
        print(f"wrote {out}: IF neuron against ReLU over T={T} (largest gap between rate and clipped "
              f"ReLU {err:.4f}, at most 1/T = {1 / T:.4f})")
        return 0
    if not args.model:
        raise OptionError(f"`onnx-snn plot {args.figure}` needs a step model: onnx-snn plot {args.figure} MODEL")
    from onnx_snn_runtime import Simulator
    from onnx_snn_runtime.cli import plot_accuracy
    sim = Simulator(args.model, args.provider)
    T = args.T or int(sim.spec.converter.get("target_T") or 50)
    ev = sim.evaluate(args.data, T, batch_size=args.batch_size, limit=args.limit, progress=not args.quiet)
    out = args.output or ("firing_rates.png" if args.figure == "firing" else "accuracy.png")
    if args.figure == "firing":
        names = {st.input: f"{st.input} {st.layer}" for st in sim.spec.states}
        rates = {names.get(k, k): v for k, v in ev.firing_rates.items()}
        means = plots.plot_firing_rates(rates, out, f"{Path(args.model).name}, T={T}, {ev.samples} samples")
        print("\n".join(f"  {layer:12s} {rate:.4f} spikes/neuron/step" for layer, rate in means.items()))
    else:
        plot_accuracy({"SNN": ev.accuracy}, out, f"{Path(args.model).name} (T={T})")
        print(f"accuracy at t={T}: {ev.accuracy[-1]:.4f}")
    print(f"wrote {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json as _json
    from .inspect import format_report, inspect
    report = inspect(args.model)
    print(_json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


def cmd_export_triton(args: argparse.Namespace) -> int:
    from .triton_export import export_triton
    path = export_triton(args.model, args.repo, name=args.name, max_batch_size=args.max_batch_size,
                         max_idle_seconds=args.max_idle_seconds, gpu=args.gpu, force=args.force)
    print(f"wrote {path}: config.pbtxt and 1/model.onnx for Triton's onnxruntime backend; serve with "
          f"tritonserver --model-repository {Path(args.repo).resolve()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Convert the sample CNN with each demo mode, simulate, print the table, plot accuracy against t."""
    import onnxruntime as ort

    from onnx_snn_runtime.cli import plot_accuracy
    from onnx_snn_runtime.datasets import DEBIAN_DIR, load_fashion_mnist, read_idx_dir
    from onnx_snn_runtime.simulator import Simulator, check_T

    T = check_T(args.T)
    full = read_idx_dir(DEBIAN_DIR, "test") is not None
    x_train, _ = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    x_calib, x_test, y_test = x_train[: args.calib_samples], x_test[: args.images], y_test[: args.images]
    print(f"data: {'full Fashion-MNIST (Debian package)' if full else 'bundled Fashion-MNIST subset'}; "
          f"calibration on {len(x_calib)} training images, test on {len(x_test)} images, T={T}")
    source = Path(__file__).resolve().parents[1] / "models" / "sample_cnn.onnx"
    ann = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    ann_acc = float(np.mean(ann.run(None, {"input": x_test})[0].argmax(1) == y_test))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = {}
    rows = [("mode", f"accuracy at T={T}", "vs ANN")]
    for mode in DEMO_MODES:
        snn = Converter(x_calib, mode, progress=False)(source)
        path = save(snn, out_dir / f"sample_cnn.{mode.replace('/', '_').replace('%', 'pct')}.snn.onnx")
        ev = Simulator(path).evaluate((x_test, y_test), T, batch_size=args.batch_size, progress=not args.quiet)
        curves[mode] = ev.accuracy
        rows.append((mode, f"{ev.accuracy[-1]:.4f}", f"{100 * (ev.accuracy[-1] - ann_acc):+.2f} pt"))
        print(f"  {mode:6s} done: {ev.accuracy[-1]:.4f}", flush=True)
    rows.append(("ANN", f"{ann_acc:.4f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    plot = out_dir / "demo_accuracy.png"
    plot_accuracy(curves, str(plot), f"Sample CNN as SNN, Fashion-MNIST ({len(x_test)} test images)", ann_acc)
    print(f"\nwrote {plot} and the six step models in {out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnx-snn", description="Convert ReLU networks to spiking neural networks.")
    parser.add_argument("--version", action="version", version=f"onnx-snn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert an ONNX ReLU network into an SNN step model")
    c.add_argument("model", help="source .onnx model")
    c.add_argument("--calib", required=True, help="calibration data: an .npz (array 'x') or 'fashion-mnist'")
    c.add_argument("--mode", default=None, help="'max', a percentile like '99.9%%', a fraction k of the max, "
                   "or 'search' (with --target-T) (default: max; with --target-T alone, the preset)")
    c.add_argument("-o", "--output", help="output path (default: MODEL with .snn.onnx)")
    c.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None, help="one scale per channel instead of per layer")
    c.add_argument("--no-fuse", action="store_true", help="do not fold BatchNormalization")
    c.add_argument("--no-fold-scales", action="store_true",
                   help="keep the threshold-scaling Muls around each neuron (SpikingJelly's VoltageScalers) "
                        "instead of folding them into the weights")
    c.add_argument("--maxpool", choices=STRATEGIES, default="running_max", help="MaxPool strategy (default: running_max)")
    c.add_argument("--reset", choices=("subtract", "zero"), default="subtract", help="neuron reset (default: subtract)")
    c.add_argument("--v-init", default=None, help="initial membrane potential in thresholds: a number or 'half' "
                   "(default 0)")
    c.add_argument("--target-T", type=int, default=None,
                   help="timesteps the model is built for: recorded (the default T of 'run'), needed by "
                   "--mode search and the corrections; alone (no --mode), applies the recipe the accuracy "
                   "benchmark found best at that T")
    c.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="correct each layer's mean output for --target-T steps (Li et al. 2021)")
    c.add_argument("--potential-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="then set per-neuron initial potentials for --target-T steps (Li et al. 2021)")
    c.add_argument("--output-decoding", choices=("analog", "spikes"), default="analog",
                   help="sum the last layer's outputs (analog, default) or make them neurons (spikes)")
    c.add_argument("--batch-size", type=int, default=256, help="calibration batch size (default: 256)")
    c.add_argument("--bins", type=int, default=None, help="histogram bins for percentiles (power of two)")
    c.add_argument("--limit", type=int, default=None, help="use only the first N calibration samples")
    c.add_argument("--force", action="store_true", help="allow overwriting the input model")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    c.set_defaults(func=cmd_convert)
    add_run_parser(sub)
    add_serve_parser(sub)
    p = sub.add_parser("plot", help="figures: an IF neuron against ReLU, a model's per-layer firing rates, "
                       "or its accuracy against t")
    p.add_argument("figure", choices=("neuron", "firing", "accuracy"))
    p.add_argument("model", nargs="?", help="step model (for firing and accuracy)")
    p.add_argument("-o", "--output", help="PNG to write (default: if_neuron.png, firing_rates.png, accuracy.png)")
    p.add_argument("--T", type=int, default=None, help="timesteps (default: 128 for neuron; the model's target T, else 50)")
    p.add_argument("--v-init", type=float, default=0.0, help="neuron: initial potential in thresholds (default 0)")
    p.add_argument("--data", default="fashion-mnist", help="dataset, as for `run` (default fashion-mnist)")
    p.add_argument("--limit", type=int, default=1000, help="samples (default 1000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--provider", default=None, help="cpu or cuda")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_plot)
    i = sub.add_parser("inspect", help="what the converter will do to an ANN, or what a step model holds")
    i.add_argument("model", help="an ANN (.onnx) or a step model (.snn.onnx)")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=cmd_inspect)
    e = sub.add_parser("export-triton", help="write a Triton model repository entry (onnxruntime backend, "
                       "sequence batcher with implicit state) for a step model")
    e.add_argument("model", help="step model (.snn.onnx)")
    e.add_argument("--repo", required=True, help="model repository folder (must exist)")
    e.add_argument("--name", default="snn", help="model name, the folder written in the repository (default snn)")
    e.add_argument("--max-batch-size", type=int, default=16, help="sequences batched together (default 16)")
    e.add_argument("--max-idle-seconds", type=float, default=60.0,
                   help="a sequence idle this long is dropped by Triton (default 60)")
    e.add_argument("--gpu", action="store_true", help="instance kind GPU (default CPU)")
    e.add_argument("--force", action="store_true", help="replace an existing model folder")
    e.set_defaults(func=cmd_export_triton)
    d = sub.add_parser("demo", help="convert the sample CNN with six modes, simulate, plot accuracy against t")
    d.add_argument("--T", type=int, default=50, help="timesteps (default 50)")
    d.add_argument("--images", type=int, default=2000, help="test images (default 2000)")
    d.add_argument("--calib-samples", type=int, default=10000, help="calibration images (default 10000)")
    d.add_argument("--batch-size", type=int, default=500)
    d.add_argument("--out-dir", default="demo_output", help="where to write the models and the plot")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except OnnxSnnError as e:
        print(f"onnx-snn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnx-snn: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
