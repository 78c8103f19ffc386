"""``onnx-snn`` command line: ``onnx-snn convert MODEL --calib DATA --mode 99.9% -o OUT``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .calibration.mode import parse_mode
from .converter import Converter
from .errors import OnnxSnnError, OptionError
from .io import save
from .passes.maxpool import STRATEGIES

log = logging.getLogger("onnx_snn")


def _calibration_data(spec: str, limit: int | None):
    """An .npz path, or ``fashion-mnist`` (the training split: full set if installed, else bundled)."""
    if spec.lower() in ("fashion-mnist", "fashion_mnist", "fmnist"):
        from onnx_snn_runtime.datasets import load_fashion_mnist
        x, _ = load_fashion_mnist("train")
        return x[:limit] if limit else x
    if limit:
        with np.load(spec) as z:
            key = next((k for k in ("x", "images", "inputs") if k in z.files), z.files[0])
            return z[key][:limit]
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
    mode = parse_mode(args.mode)  # refuse a bad mode before loading any data
    converter = Converter(_calibration_data(args.calib, args.limit), mode, fuse_flag=not args.no_fuse,
                          per_channel=args.per_channel, maxpool=args.maxpool, reset_mode=args.reset,
                          batch_size=args.batch_size, bins=args.bins, progress=not args.quiet)
    snn = converter(args.model)
    save(snn, out)
    if not args.quiet:
        print(format_table(converter.report))
        print(f"\nwrote {out} ({len(converter.report)} neuron layers, mode {converter.mode})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnx-snn", description="Convert ReLU networks to spiking neural networks.")
    parser.add_argument("--version", action="version", version=f"onnx-snn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert an ONNX ReLU network into an SNN step model")
    c.add_argument("model", help="source .onnx model")
    c.add_argument("--calib", required=True, help="calibration data: an .npz (array 'x') or 'fashion-mnist'")
    c.add_argument("--mode", default="max", help="'max', a percentile like '99.9%%', or a fraction k of the max (default: max)")
    c.add_argument("-o", "--output", help="output path (default: MODEL with .snn.onnx)")
    c.add_argument("--per-channel", action="store_true", help="one scale per channel instead of per layer")
    c.add_argument("--no-fuse", action="store_true", help="do not fold BatchNormalization")
    c.add_argument("--maxpool", choices=STRATEGIES, default="running_max", help="MaxPool strategy (default: running_max)")
    c.add_argument("--reset", choices=("subtract", "zero"), default="subtract", help="neuron reset (default: subtract)")
    c.add_argument("--batch-size", type=int, default=256, help="calibration batch size (default: 256)")
    c.add_argument("--bins", type=int, default=None, help="histogram bins for percentiles (power of two)")
    c.add_argument("--limit", type=int, default=None, help="use only the first N calibration samples")
    c.add_argument("--force", action="store_true", help="allow overwriting the input model")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    c.set_defaults(func=cmd_convert)
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
