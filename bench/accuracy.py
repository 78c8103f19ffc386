"""SNN accuracy against T for every model x recipe: ours beside SpikingJelly 2.0's, and the ANN.

    python bench/accuracy.py [--models sample_cnn,vgg8,...] [--images 10000] [--calib 5000]
                             [--T 4,8,16,32] [--no-spikingjelly] [--threads 2] [--device cpu|cuda]
                             [--resume] [--table-only]

Models: our four (``MODELS``), on which recipes and defaults were chosen, and the held-out ones
(``models/zoo.py: HELD_OUT``), never used to choose anything, reported in a section of their own.

Each model's figures go to ``bench/results/accuracy_<model>.json`` as soon as a recipe is done
(so models can run in separate processes); the table ``bench/results/accuracy.md`` and a plot
``bench/results/accuracy_<model>.png`` per model are then rebuilt from every JSON present.

Protocol: test images are the first ``--images`` of the Fashion-MNIST test set (all 10000 by
default; the bundled 2000 when the full set is not installed), calibration images the first
``--calib`` of the training set, the same for every recipe. A recipe that does not depend on T
is simulated once for max(T) steps and read after every t; a recipe calibrated for a target T
(``per_T``) is converted and simulated once per T. The preset row is ``Converter(x_calib,
target_T=T)`` as a user calls it: it holds out part of the calibration images and chooses among
its candidates (``onnx_snn.selection``); which one it chose at each T is recorded and shown.

SpikingJelly 2.0 is a bench-only dependency (``bash scripts/setup_bench.sh``). Its converter
gets the same trained torch weights (``models/<name>.pt``, from which ``models/<name>.onnx``
was exported) and the same calibration images; its SNN runs in torch.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_snn_runtime import Simulator  # noqa: E402
from onnx_snn_runtime.datasets import load_fashion_mnist  # noqa: E402

import onnx_snn  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TUNED = ("sample_cnn", "vgg8", "resnet20", "maxpool_cnn")  # recipes and defaults were chosen on these
HELD_OUT = ("mobilenet_s", "densenet_s")                  # models/zoo.py: HELD_OUT; only reported
MODELS = TUNED + HELD_OUT
PRESET = "preset: Converter(target_T=T), recipe chosen on held-out data"


@dataclass(frozen=True)
class Recipe:
    label: str
    options: Callable[[int], dict]  # target T -> Converter options
    per_T: bool = False             # calibrated for each T (converted once per T)
    preset: bool = False            # the preset as users get it (with its recipe selection)


CORRECTED = dict(mode="search", v_init="half", bias_correction=True, potential_correction=True)
OURS = [
    Recipe("99.9%", lambda T: dict(mode="99.9%")),
    Recipe("99.9%, channel-wise, half", lambda T: dict(mode="99.9%", per_channel=True, v_init="half")),
    Recipe("search(T), half, bias+potential", lambda T: dict(CORRECTED, target_T=T), per_T=True),
    Recipe("search(T), channel-wise, half, bias+potential",
           lambda T: dict(CORRECTED, per_channel=True, target_T=T), per_T=True),
    Recipe("search(T), channel-wise, half, tuned, bias+potential",
           lambda T: dict(CORRECTED, per_channel=True, threshold_tuning=True, target_T=T), per_T=True),
    Recipe(PRESET, lambda T: dict(target_T=T), per_T=True, preset=True),
]


# Rows never within a point of the best at T <= 32 in the previous full table (2026-11-28):
# ``--lean`` skips them to fit the 2-core machine's time.
LEAN_SKIPS = {"99.9%", "search(T), half, bias+potential", "SJ max", "SJ 99.9%"}


def spikingjelly_recipes(loader) -> dict[str, Callable]:
    from spikingjelly.activation_based import ann2snn
    return {
        "SJ max": lambda: ann2snn.RateCodingRecipe(loader, mode="max"),
        "SJ 99.9%": lambda: ann2snn.RateCodingRecipe(loader, mode="99.9%"),
        "SJ 99.9%, channel-wise, half": lambda: ann2snn.RateCodingRecipe(
            loader, mode="99.9%", channel_wise=True, half_threshold=True),
        "SJ local threshold balancing": lambda: ann2snn.LocalThresholdBalancingRecipe(loader),
    }


def ours(model: str, recipe: Recipe, x_calib, x_test, y_test, ts: list[int], threads: int,
         device: str, choices: dict) -> dict[int, float]:
    """Accuracy at each T; for the preset, ``choices[T]`` = the recipe its selection chose."""
    source = ROOT / "models" / f"{model}.onnx"

    def accuracy_curve(options: dict, T: int) -> np.ndarray:
        converter = onnx_snn.Converter(x_calib, progress=False, **options)
        snn = converter(source)
        if converter.selection is not None:
            choices[str(T)] = converter.selection.chosen
        sim = Simulator(snn.SerializeToString(), device, threads=threads)
        return sim.evaluate((x_test, y_test), T, batch_size=250, progress=False).accuracy

    if recipe.per_T:
        return {T: float(accuracy_curve(recipe.options(T), T)[T - 1]) for T in ts}
    curve = accuracy_curve(recipe.options(max(ts)), max(ts))
    return {T: float(curve[T - 1]) for T in ts}


def spikingjelly(model: str, make_recipe: Callable, x_calib, x_test, y_test, ts: list[int],
                 device: str) -> dict[int, float]:
    import torch
    from spikingjelly.activation_based import ann2snn, functional
    sys.path.insert(0, str(ROOT / "models"))
    from zoo import load_trained
    snn = ann2snn.FXConverter(recipe=make_recipe(), device=device).convert(copy.deepcopy(load_trained(model)))
    snn.eval()
    correct = np.zeros(max(ts))
    with torch.no_grad():
        for start in range(0, len(x_test), 250):
            x = torch.from_numpy(x_test[start:start + 250]).to(device)
            y = torch.from_numpy(y_test[start:start + 250].astype(np.int64)).to(device)
            functional.reset_net(snn)
            total = None
            for t in range(max(ts)):
                out = snn(x)
                total = out if total is None else total + out
                correct[t] += (total.argmax(1) == y).sum().item()
    return {T: float(correct[T - 1] / len(x_test)) for T in ts}


def run_model(model: str, args, ts: list[int]) -> None:
    x_train, _ = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    x_calib, x_test, y_test = x_train[: args.calib], x_test[: args.images], y_test[: args.images]
    path = RESULTS / f"accuracy_{model}.json"
    record = json.loads(path.read_text()) if path.exists() and args.resume else {}
    if record and (record["images"], record["calib"]) != (len(x_test), len(x_calib)):
        print(f"{model}: the saved rows used {record['images']} test / {record['calib']} calibration images; "
              "starting afresh", flush=True)
        record = {}
    ann = ort.InferenceSession(str(ROOT / "models" / f"{model}.onnx"), providers=["CPUExecutionProvider"])
    record.update(model=model, images=len(x_test), calib=len(x_calib), ts=ts,
                  ann=float(np.mean(ann.run(None, {"input": x_test})[0].argmax(1) == y_test)),
                  machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s) per simulator"
                  + (", simulated on CUDA" if args.device == "cuda" else ""),
                  onnxruntime=ort.__version__)
    # keep the rows of recipes that still exist (a per-T row may be partial: its missing T run)
    current = {"ours": {r.label for r in OURS}}
    if args.spikingjelly:
        current["spikingjelly"] = set(spikingjelly_recipes(None))
    for side in ("ours", "spikingjelly"):
        record[side] = {label: row for label, row in record.get(side, {}).items()
                        if side not in current or label in current[side]}
    print(f"{model}: ANN {record['ann']:.4f} on {len(x_test)} test images; {len(x_calib)} calibration images",
          flush=True)
    choices = record.setdefault("preset_choices", {})
    # (order, side, label, T or None for every T, job): the smallest T first, all its recipes
    # before the next T, so that an interrupted run leaves whole columns
    jobs: list[tuple] = []
    for r in OURS:
        for T in (ts if r.per_T else [None]):
            run = lambda r=r, T=T: ours(model, r, x_calib, x_test, y_test, [T] if T else ts, args.threads,  # noqa: E731
                                        args.device, choices)
            jobs.append((T or ts[min(1, len(ts) - 1)], r.label != PRESET, "ours", r.label, T, run))
    if args.spikingjelly:
        import torch
        torch.set_num_threads(args.threads)
        loader = torch.utils.data.DataLoader(torch.from_numpy(x_calib), batch_size=256)
        jobs += [(ts[min(1, len(ts) - 1)], True, "spikingjelly", label, None,
                  lambda make=make: spikingjelly(model, make, x_calib, x_test, y_test, ts, args.device))
                 for label, make in spikingjelly_recipes(loader).items()]
    if args.lean:
        jobs = [job for job in jobs if job[3] not in LEAN_SKIPS]
    jobs.sort(key=lambda job: job[:2])
    refused = record.setdefault("refused", {})  # SpikingJelly recipes that cannot convert the model
    for _, _, side, label, T, job in jobs:
        if label in refused:
            continue
        row = record[side].setdefault(label, {})
        if all(str(t) in row for t in ([T] if T else ts)):
            continue
        start = time.perf_counter()
        try:
            accuracy = job()
        except Exception as e:  # noqa: BLE001 - SpikingJelly's converter refusing a model is a result
            if side != "spikingjelly":
                raise
            del record[side][label]
            refused[label] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            print(f"  {label:48s} refused: {refused[label]}", flush=True)
            write_text(path, json.dumps(record, indent=1))
            continue
        row.update({str(t): a for t, a in accuracy.items()})
        print(f"  {label:48s} " + " ".join(f"T={t}: {a:.4f}" for t, a in accuracy.items())
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
        write_text(path, json.dumps(record, indent=1))


def write_text(path: Path, text: str) -> None:
    """Temporary file, then rename: an interrupted run leaves the previous file whole."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def best(rows: dict[str, dict], T: int) -> float:
    return max((row[str(T)] for row in rows.values() if str(T) in row), default=float("nan"))


def model_table(rec: dict) -> str:
    ts = rec["ts"]
    head = "| recipe | " + " | ".join(f"T={T}" for T in ts) + " |"
    lines = [head, "|" + " --- |" * (len(ts) + 1)]
    for side in ("ours", "spikingjelly"):
        for label, row in rec[side].items():
            cells = []
            for T in ts:
                value = row.get(str(T))
                mark = value is not None and value == best(rec[side], T)
                cells.append("" if value is None else (f"**{value:.4f}**" if mark else f"{value:.4f}"))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| ANN | " + " | ".join(f"{rec['ann']:.4f}" for _ in ts) + " |")
    if rec["spikingjelly"]:
        lines.append("| ours best − SJ best (points) | " + " | ".join(
            f"{100 * (best(rec['ours'], T) - best(rec['spikingjelly'], T)):+.1f}" for T in ts) + " |")
    lines.append("| ours best − ANN (points) | " + " | ".join(
        f"{100 * (best(rec['ours'], T) - rec['ann']):+.1f}" for T in ts) + " |")
    if PRESET in rec["ours"]:
        rivals = {**{k: v for k, v in rec["ours"].items() if k != PRESET}, **rec["spikingjelly"]}
        preset = rec["ours"][PRESET]
        lines.append("| preset − best other recipe, both sides (points) | " + " | ".join(
            f"{100 * (preset[str(T)] - best(rivals, T)):+.1f}" if str(T) in preset else "" for T in ts) + " |")
    for label, reason in rec.get("refused", {}).items():
        lines += ["", f"{label}: SpikingJelly 2.0 cannot convert this model ({reason})."]
    choices = rec.get("preset_choices", {})
    if choices:
        lines += ["", "The preset chose: " + "; ".join(f"T={T}: {choices[str(T)]}" for T in ts if str(T) in choices)
                  + "."]
    return "\n".join(lines)


def summary_table(records: list[dict]) -> str:
    """One row per model: the preset's accuracy, the best of SpikingJelly's recipes at each T, and the ANN."""
    ts = sorted({T for rec in records for T in rec["ts"]})
    lines = ["| model (test images) | ANN | " + " | ".join(f"T={T} preset / SJ best" for T in ts) + " |",
             "|" + " --- |" * (len(ts) + 2)]
    show = lambda v: "–" if v != v else f"{v:.4f}"  # noqa: E731  (NaN: no row at that T)
    for rec in records:
        preset = rec["ours"].get(PRESET, {})
        cells = [f"{show(preset.get(str(T), float('nan')))} / {show(best(rec['spikingjelly'], T))}" for T in ts]
        lines.append(f"| {rec['model']} ({rec['images']}) | {rec['ann']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rec: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ts = rec["ts"]
    for side, style in (("ours", "-o"), ("spikingjelly", "--s")):
        for label, row in rec[side].items():
            ax.plot([T for T in ts if str(T) in row], [row[str(T)] for T in ts if str(T) in row], style,
                    label=label, markersize=4)
    ax.axhline(rec["ann"], color="black", linewidth=1, label=f"ANN ({rec['ann']:.4f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ts, [str(T) for T in ts])
    ax.set_xlabel("timesteps T")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(max(0.0, min(rec["ann"] - 0.3, ax.get_ylim()[0])), min(1.0, rec["ann"] + 0.02))
    ax.set_title(f"{rec['model']}: SNN accuracy against T ({rec['images']} test images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report() -> Path:
    records = [json.loads(p.read_text()) for m in MODELS if (p := RESULTS / f"accuracy_{m}.json").exists()]
    parts = ["# SNN accuracy against T: onnx-snn's recipes beside SpikingJelly 2.0's",
             "", "Produced by `python bench/accuracy.py` (see its docstring for the protocol). Bold: the best "
             "of each side at that T. SJ = SpikingJelly 2.0.0 `ann2snn` (`RateCodingRecipe`, "
             "`LocalThresholdBalancingRecipe`) on the same trained weights and calibration images. "
             "`search(T)` rows are converted for each T (threshold search, bias and potential "
             "correction calibrated for that T); the others once, read after every t. "
             f"`{PRESET}` is the preset as users get it (`onnx_snn/presets.py`, `onnx_snn/selection.py`). "
             "\"Best\" is the best row of each side at each T on these test images, for both sides alike.", ""]
    for title, names in (("Models the recipes were chosen on", TUNED),
                         ("Held-out models (never used to choose recipes or defaults)", HELD_OUT)):
        chosen = [rec for rec in records if rec["model"] in names]
        if chosen:
            parts += [f"{title}: the preset beside SpikingJelly's best recipe at each T.", "",
                      summary_table(chosen), ""]
    for rec in records:
        plot(rec, RESULTS / f"accuracy_{rec['model']}.png")
        parts += [f"## {rec['model']}", "",
                  f"{rec['images']} test images, {rec['calib']} calibration images; {rec['machine']}; "
                  f"onnxruntime {rec['onnxruntime']}. Plot: `accuracy_{rec['model']}.png`.", "",
                  model_table(rec), ""]
    out = RESULTS / "accuracy.md"
    write_text(out, "\n".join(parts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--images", type=int, default=10000, help="test images (default: all 10000)")
    parser.add_argument("--calib", type=int, default=5000, help="calibration images (default 5000)")
    parser.add_argument("--T", default="4,8,16,32", help="timesteps to report")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both simulators")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="simulate both SNNs on the CPU or on a GPU (onnxruntime-gpu, torch with CUDA)")
    parser.add_argument("--no-spikingjelly", dest="spikingjelly", action="store_false")
    parser.add_argument("--resume", action="store_true", help="keep the recipes already in the JSON")
    parser.add_argument("--lean", action="store_true", help="skip the rows in LEAN_SKIPS (never competitive at T<=32)")
    parser.add_argument("--table-only", action="store_true", help="rebuild the table and plots only")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        os.environ.setdefault("TQDM_DISABLE", "1")  # SpikingJelly's calibration progress bars
        ts = sorted(int(t) for t in args.T.split(","))
        for model in args.models.split(","):
            if model not in MODELS:
                parser.error(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
            run_model(model, args, ts)
    print(f"wrote {write_report()}")


if __name__ == "__main__":
    main()
