"""``onnx-snn`` command line: ``convert`` (an ANN into a step model), ``run`` (simulate it),
``inspect``, ``plot``, ``serve`` (Triton through PyTriton), ``export-triton`` (a Triton model repository entry),
``export-nir`` (a NIR graph), ``demo``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from onnx_snn_runtime.cli import add_info_parser, add_serve_parser, quiet_broken_pipe
from onnx_snn_runtime.cli import add_parser as add_run_parser

from . import __version__
from .calibration.data import FASHION_MNIST_IMAGES, calibration_source
from .calibration.mode import parse_mode
from .converter import Converter
from .errors import OnnxSnnError, OptionError
from .io import save
from .options import add_cli_arguments, from_cli, v_init_argument
from .passes.base import CHECK_ENV
from .tables import lambda_text, table

log = logging.getLogger("onnx_snn")


def format_table(layers: list[dict]) -> str:
    """The calibration report: one row per neuron layer."""
    return table([(i, e["node"], e["op"], lambda_text(e["lambda"]), f"{e['max']:.4g}", f"{100 * e['share_above']:.3f}%")
                  for i, e in enumerate(layers)], ("#", "node", "op", "lambda", "max", "above lambda"))


def cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.output) if args.output else Path(args.model).with_suffix(".snn.onnx")
    if out.resolve() == Path(args.model).resolve() and not args.force:
        raise OptionError(f"output {out} is the input model; choose another -o or pass --force")
    given = from_cli(args)
    if "mode" in given:
        given["mode"] = parse_mode(given["mode"])  # refuse a bad mode before loading data
    data, source = calibration_source(args.calib, args.limit)
    if not args.quiet:
        print(source)
    converter = Converter(data, progress=not args.quiet, **given)
    snn = converter(args.model)
    save(snn, out)
    if not args.quiet:
        print(format_table(converter.report))
        if converter.selection is not None:
            print("\n" + "\n".join(converter.selection.lines()))
        print(f"\nwrote {out} ({len(converter.report)} neuron layers; {converter.describe()})")
    return 0


DEMO_MODES = ("max", "99.9%", "1/2", "1/3", "1/4", "1/5")  # the seed tutorial's six modes


def cmd_plot(args: argparse.Namespace) -> int:
    from . import plots
    if args.T is not None and args.T <= 0:
        raise OptionError(f"--T {args.T}: the number of timesteps must be a positive integer")
    if args.figure == "neuron":
        out = args.output or "if_neuron.png"
        T = args.T or 128
        c = plots.plot_if_neuron(out, T=T, v_init=v_init_argument(args.v_init))
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
        from onnx_snn_runtime.cli import ann_accuracy
        reference = ann_accuracy(args.ann, args.data, args.limit) if args.ann else None
        plot_accuracy({"SNN": ev.accuracy}, out, f"{Path(args.model).name} (T={T})", reference)
        print(f"accuracy at t={T}: {ev.accuracy[-1]:.4f}"
              + (f" (ANN: {reference:.4f} on the same {ev.samples} samples)" if reference is not None else ""))
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


def cmd_export_nir(args: argparse.Namespace) -> int:
    from .nir_export import write_nir
    output = Path(args.output or str(args.model).removesuffix(".onnx").removesuffix(".snn") + ".nir")
    if output.exists() and not args.force:
        raise OnnxSnnError(f"{output} exists; give --force to replace it")
    graph = write_nir(args.model, output, pooling=args.pool, initial_potentials=args.initial_potentials)
    kinds = Counter(type(node).__name__ for node in graph.nodes.values())
    print(f"wrote {output}: NIR graph of {', '.join(f'{n} {k}' for k, n in kinds.items())}; "
          f"{len(graph.edges)} edges (docs/nir.md: what each importer makes of it)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Convert the sample CNN with each demo mode, simulate, print the table, plot accuracy against t."""
    from onnx_snn_runtime.cli import ann_accuracy, plot_accuracy
    from onnx_snn_runtime.datasets import fashion_mnist
    from onnx_snn_runtime.simulator import Simulator, check_T

    T = check_T(args.T)
    source = Path(__file__).resolve().parents[1] / "models" / "sample_cnn.onnx"
    if not source.is_file():
        raise OnnxSnnError(f"`onnx-snn demo` converts the repository's sample CNN ({source}), which an installed "
                           "package does not carry: run it from a source checkout set up with "
                           "`bash scripts/setup.sh` (pip install -e), or convert your own model with `onnx-snn convert`")
    x_train, _, _ = fashion_mnist("train")
    x_test, y_test, origin = fashion_mnist("test")
    x_calib, x_test, y_test = x_train[: args.calib_samples], x_test[: args.images], y_test[: args.images]
    print(f"data: Fashion-MNIST, {origin.split(' (')[0]}; "
          f"calibration on {len(x_calib)} training images, test on {len(x_test)} images, T={T}")
    ann_acc = ann_accuracy(source, (x_test, y_test))
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
    print()
    print(table(rows[1:], rows[0]))
    plot = out_dir / "demo_accuracy.png"
    plot_accuracy(curves, str(plot), f"Sample CNN as SNN, Fashion-MNIST ({len(x_test)} test images)", ann_acc)
    print(f"\nwrote {plot} and the six step models in {out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnx-snn", description="Convert ReLU networks to spiking neural networks.")
    parser.add_argument("--version", action="version", version=f"onnx-snn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    parser.add_argument("--check-passes", action="store_true",
                        help="check each pass's guarantee on its result (slower; for debugging the converter)")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert an ONNX ReLU network into an SNN step model")
    c.add_argument("model", help="source .onnx model")
    c.add_argument("--calib", required=True,
                   help="calibration data: an .npz (array 'x', else 'images', 'inputs', 'x_calib', 'x_train', "
                        f"'x_test', else its first), file.npz:ARRAY, or 'fashion-mnist' (the first "
                        f"{FASHION_MNIST_IMAGES} training images unless --limit)")
    c.add_argument("-o", "--output", help="output path (default: MODEL with .snn.onnx)")
    add_cli_arguments(c)  # the converter options, from onnx_snn.options.ConvertOptions
    c.add_argument("--limit", type=int, default=None, help="use only the first N calibration samples")
    c.add_argument("--force", action="store_true", help="allow overwriting the input model")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    c.set_defaults(func=cmd_convert)
    add_run_parser(sub)
    add_serve_parser(sub)
    add_info_parser(sub)
    p = sub.add_parser("plot", help="figures: an IF neuron against ReLU, a model's per-layer firing rates, "
                       "or its accuracy against t", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="figures:\n"
                       "  neuron    spike trains of one IF neuron for eight constant inputs, and its firing rate\n"
                       "            against the input beside the clipped ReLU (no model needed)\n"
                       "  firing    a step model's mean firing rate per layer, overall and at each t\n"
                       "  accuracy  a step model's accuracy against t (with --ann, the ANN's as a reference line)")
    p.add_argument("figure", choices=("neuron", "firing", "accuracy"), help="neuron, firing or accuracy (see above)")
    p.add_argument("model", nargs="?", help="step model (for firing and accuracy)")
    p.add_argument("-o", "--output", help="PNG to write (default: if_neuron.png, firing_rates.png, accuracy.png)")
    p.add_argument("--T", type=int, default=None, help="timesteps (default: 128 for neuron; the model's target T, else 50)")
    p.add_argument("--v-init", type=str, default="0", help="neuron: initial potential in thresholds, a number or "
                   "'half' (default 0)")
    p.add_argument("--ann", default=None, help="accuracy: the ANN (.onnx) the model was converted from, evaluated "
                   "on the same samples and drawn as a reference line")
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
    e.add_argument("--repo", required=True, help="model repository folder (created if missing)")
    e.add_argument("--name", default="snn", help="model name, the folder written in the repository (default snn)")
    e.add_argument("--max-batch-size", type=int, default=16, help="sequences batched together (default 16)")
    e.add_argument("--max-idle-seconds", type=float, default=60.0,
                   help="a sequence idle this long is dropped by Triton (default 60)")
    e.add_argument("--gpu", action="store_true", help="instance kind GPU (default CPU)")
    e.add_argument("--force", action="store_true", help="replace an existing model folder")
    e.set_defaults(func=cmd_export_triton)
    n = sub.add_parser("export-nir", help="write a step model as a NIR graph (HDF5) for snnTorch, Norse, sinabs, "
                       "Rockpool, Lava; see docs/nir.md")
    n.add_argument("model", help="step model (.snn.onnx)")
    n.add_argument("-o", "--output", help="NIR file to write (default: MODEL with .nir)")
    n.add_argument("--pool", choices=("sum", "avg"), default="sum",
                   help="average pooling as SumPool2d with its divisor folded into the next layer (default; "
                        "sinabs and Norse read it) or as AvgPool2d (snnTorch reads it)")
    n.add_argument("--initial-potentials", choices=("refuse", "metadata"), default="refuse",
                   help="non-zero initial membrane potentials, which NIR has no field for: refuse (default) or "
                        "keep them in each IF node's metadata (onnx_snn.v_init) for you to set in the importer")
    n.add_argument("--force", action="store_true", help="replace an existing file")
    n.set_defaults(func=cmd_export_nir)
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
    if args.check_passes:
        os.environ[CHECK_ENV] = "1"
    try:
        return args.func(args)
    except OnnxSnnError as e:
        print(f"onnx-snn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnx-snn: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return quiet_broken_pipe()


if __name__ == "__main__":
    sys.exit(main())
