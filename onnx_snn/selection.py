"""The self-validating preset: try each candidate recipe on held-out calibration data, keep the best.

``Converter(data, target_T=T)`` without a ``mode`` (and ``select_recipe`` on, the default)
holds out part of the calibration data (``held_out_size(n)`` samples: a fifth, at most
``MAX_HELD_OUT``; from arrays every k-th sample, so that data sorted by class is held out
evenly; from a loader its first whole batches, of its first pass when it shuffles), converts
the model with each of the preset's candidates (``presets.candidates``) calibrated on the
rest, simulates T steps on the held-out samples and keeps the candidate that scores best there:

* with labels (the data yields ``(x, y)`` batches), the accuracy after T steps;
* without, the agreement of the SNN's prediction after T steps with the ANN's (argmax of the
  first output), ties broken by the mean squared difference of the outputs.

Ties keep the earlier candidate. The cost is bounded: one conversion per candidate (each
bounded by its own passes) and one T-step simulation of at most ``MAX_HELD_OUT`` samples each.
Threshold tuning simulates the network once per layer and trial factor, which on a large
network costs far more than the other candidates: a candidate with tuning is skipped (and the
skip reported) when its estimated tuning time, from the first candidate's simulation speed,
exceeds ``TUNING_BUDGET`` times the first candidate's conversion time (and ``MIN_TUNING_BUDGET``).
Every trial's score and time, and the choice, go into the step model (``onnx_snn.converter``,
key ``selection``) and the log; ``onnx-snn convert`` prints them.

Data that can be read only once (an iterator or generator) cannot feed several conversions:
the converter then uses the first candidate and says so.
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx_snn_runtime.data import to_numpy

from .calibration.data import InputSpec, iterate_batches, named_arrays
from .errors import OnnxSnnError
from .model_util import cpu_session

log = logging.getLogger(__name__)

MAX_HELD_OUT = 512
# Bytes of simulated state (x 3: inputs, outputs, activations) while scoring a candidate: ResNet-50
# at 224 holds 42 MB of potentials per image, so 4 images at a time (bench/scale.py --recipes
# selection: peak 5.18 GB scoring 16 at a time, 4.20 GB with this bound).
SCORE_MEMORY = 512 << 20
MIN_HELD_OUT = 32   # fewer held-out samples than this cannot tell recipes apart: no selection
TUNING_BUDGET = 4.0
MIN_TUNING_BUDGET = 60.0  # seconds


def held_out_size(n: int) -> int:
    return min(MAX_HELD_OUT, n // 5)


@dataclass
class Trial:
    label: str
    options: dict
    score: float | None = None    # accuracy or agreement on the held-out samples after T steps
    error: float | None = None    # mean squared difference from the ANN's first output
    seconds: float = 0.0
    failure: str | None = None
    skipped: str | None = None    # why the candidate was not tried

    def to_json(self) -> dict:
        entry = {"label": self.label, "options": self.options, "seconds": round(self.seconds, 2)}
        if self.skipped is not None:
            entry["skipped"] = self.skipped
        elif self.failure is None:
            entry.update(score=self.score, error=self.error)
        else:
            entry["failure"] = self.failure
        return entry

    @property
    def scored(self) -> bool:
        return self.failure is None and self.skipped is None


@dataclass
class Selection:
    metric: str                   # "accuracy" or "agreement"
    held_out: int
    T: int
    trials: list[Trial] = field(default_factory=list)
    chosen: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"metric": self.metric, "held_out": self.held_out, "T": self.T, "chosen": self.chosen,
                "seconds": round(self.seconds, 2), "trials": [t.to_json() for t in self.trials]}

    def lines(self) -> list[str]:
        """For people: one line per candidate, the chosen one marked."""
        out = [f"recipe chosen on {self.held_out} held-out samples at T={self.T} by {self.metric} "
               f"({self.seconds:.1f} s):"]
        for t in self.trials:
            mark = "*" if t.label == self.chosen else " "
            result = (f"{self.metric} {t.score:.4f}, output error {t.error:.4g}" if t.scored
                      else f"skipped: {t.skipped}" if t.skipped else f"failed: {t.failure}")
            out.append(f" {mark} {t.label}: {result} ({t.seconds:.1f} s)")
        return out


@dataclass
class HeldOut:
    feeds: dict[str, np.ndarray]  # the held-out samples, as the model's inputs
    labels: np.ndarray | None
    calibration: Any              # the rest of the data, in a form the converter reads again


class _Skip:
    """An iterable of batches without its first ``count`` batches, readable again and again."""

    def __init__(self, data: Iterable, count: int):
        self.data, self.count = data, count

    def __iter__(self):
        return itertools.islice(iter(self.data), self.count, None)


def _labels(item: Any) -> np.ndarray | None:
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        y = to_numpy(item[1])
        x = item[0] if not isinstance(item[0], dict) else next(iter(item[0].values()))
        if y.ndim == 1 and len(y) == len(to_numpy(x)) and np.issubdtype(y.dtype, np.integer):
            return y
    return None


def split(data: Any, model: onnx.ModelProto, batch_size: int) -> HeldOut | None:
    """The held-out samples and the calibration data without them; None when the data cannot
    be read more than once or is too small to hold samples out."""
    inits = {t.name for t in model.graph.initializer}
    specs = [InputSpec.of(i) for i in model.graph.input if i.name not in inits]
    data = named_arrays(data, specs)
    if isinstance(data, dict):
        arrays = {k: to_numpy(v) for k, v in data.items()}
        n = len(next(iter(arrays.values())))
        h = held_out_size(n)
        if h < MIN_HELD_OUT:
            return None
        picked = np.arange(0, n, n // h)[:h]
        feeds = _prepared({k: v[picked] for k, v in arrays.items()}, specs, batch_size)
        return HeldOut(feeds, None, {k: np.delete(v, picked, axis=0) for k, v in arrays.items()})
    if isinstance(data, Iterator) or not isinstance(data, Iterable):
        return None
    sizes = [len(to_numpy(item[0] if isinstance(item, (tuple, list)) else item)) if not isinstance(item, dict)
             else len(to_numpy(next(iter(item.values())))) for item in data]
    h = held_out_size(sum(sizes))
    batches = next((i + 1 for i, total in enumerate(itertools.accumulate(sizes)) if total >= h), 0)
    if h < MIN_HELD_OUT or batches >= len(sizes):
        return None
    items = list(itertools.islice(iter(data), batches))
    labels = [_labels(item) for item in items]
    feeds = _prepared(items, specs, batch_size)
    return HeldOut(feeds, np.concatenate(labels) if all(y is not None for y in labels) else None,
                   _Skip(data, batches))


def _prepared(data: Any, specs: list[InputSpec], batch_size: int) -> dict[str, np.ndarray]:
    """The samples through the calibration reader (scaling, checks), as one feed dict."""
    batches, _ = iterate_batches(data, specs, batch_size)
    parts = list(batches)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def select(convert, source: onnx.ModelProto, options, data: Any, given: dict):
    """(step model, record, Selection or None) of the best candidate. ``convert(options, data)``
    runs the converter's pipeline; ``options`` are the preset's ``ConvertOptions``, ``given`` the
    recipe options the caller set (they override every candidate's)."""
    from . import presets
    from .options import recipe_fields

    start = time.perf_counter()
    held = split(data, source, options.batch_size)
    first = dataclasses.replace(options, select_recipe=False)
    if held is None:
        log.warning("the calibration data cannot be read more than once, or holds fewer than %d samples to hold "
                    "out: no recipe selection; using the preset's first recipe (%s)", 5 * MIN_HELD_OUT,
                    presets.CANDIDATES[0][0])
        return (*convert(first, data), None)
    reference = _ann_outputs(source, held.feeds, options.batch_size)
    expected = held.labels if held.labels is not None else _predictions(reference)
    metric = "accuracy" if held.labels is not None else "agreement"
    selection = Selection(metric, len(expected), options.target_T)
    best, pace = None, None
    for label, recipe in presets.candidates(given):
        trial = Trial(label, {k: v for k, v in recipe.items() if v != presets.PLAIN[k]})
        selection.trials.append(trial)
        if recipe["threshold_tuning"] and pace is not None:
            trial.skipped = pace.tuning_too_slow(options.target_T)
            if trial.skipped:
                log.info("candidate %r skipped: %s", label, trial.skipped)
                continue
        began = time.perf_counter()
        try:
            model = record = None  # the previous candidate's, unless it is the best: freed before converting
            gc.collect()
            model, record = convert(dataclasses.replace(first, **recipe_fields(recipe)), held.calibration)
            converted = time.perf_counter()
            trial.score, trial.error = _score(model, record, held.feeds, options.target_T, expected, reference,
                                              options.batch_size)
            if pace is None:
                pace = _Pace(converted - began, (time.perf_counter() - converted) / (len(expected) * options.target_T),
                             record)
        except OnnxSnnError as e:
            trial.failure = str(e)
            log.warning("candidate %r failed: %s", label, e)
        trial.seconds = time.perf_counter() - began
        log.info("candidate %r: %s %s, output error %s (%.1f s)", label, metric, trial.score, trial.error,
                 trial.seconds)
        if trial.scored and (best is None or (trial.score, -trial.error) > (best[0].score, -best[0].error)):
            best = (trial, model, record)
    if best is None:
        raise selection_failed(selection)
    selection.chosen, selection.seconds = best[0].label, time.perf_counter() - start
    for line in selection.lines():
        log.info("%s", line)
    return best[1], best[2], selection


@dataclass
class _Pace:
    """How fast the first candidate converted and simulated: the yardstick for tuning's cost."""
    convert_seconds: float
    seconds_per_image_step: float
    record: Any

    def tuning_too_slow(self, T: int) -> str | None:
        from .passes import tune_thresholds as tuning
        sims = tuning.simulations(len(self.record.sites))
        images = tuning.samples(T, tuning.state_bytes(self.record.states))
        estimate = sims * images * T * self.seconds_per_image_step
        budget = max(MIN_TUNING_BUDGET, TUNING_BUDGET * self.convert_seconds)
        if estimate <= budget:
            return None
        return (f"threshold tuning would take about {estimate:.0f} s ({sims} simulations of {images} images x {T} "
                f"steps), over the budget of {budget:.0f} s ({TUNING_BUDGET:g} x the first candidate's conversion)")


def selection_failed(selection: Selection) -> OnnxSnnError:
    reasons = "; ".join(f"{t.label}: {t.failure or t.skipped}" for t in selection.trials)
    return OnnxSnnError(f"every candidate recipe of the preset failed ({reasons}); give a mode to convert with "
                        "one recipe and see its error alone")


def _ann_outputs(source: onnx.ModelProto, feeds: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """The ANN's first output on the held-out samples, a calibration batch at a time (all at
    once, an ImageNet-size network's activations for 512 images would not fit in memory)."""
    ann = cpu_session(source)
    output = ann.get_outputs()[0].name
    n = len(next(iter(feeds.values())))
    return np.concatenate([ann.run([output], {k: v[i:i + batch_size] for k, v in feeds.items()})[0]
                           for i in range(0, n, batch_size)]).astype(np.float64)


def _predictions(outputs: np.ndarray) -> np.ndarray:
    return outputs.argmax(axis=1) if outputs.ndim >= 2 else (outputs > 0).astype(np.int64)


def _score(model: onnx.ModelProto, record, feeds: dict, T: int, expected: np.ndarray, reference: np.ndarray,
           batch_size: int):
    """(share of predictions equal to ``expected``, mean squared output difference) after T steps.
    The held-out images run at most ``batch_size`` at a time, fewer where their states would
    exceed ``SCORE_MEMORY``: onnxruntime's buffers grow with the batch (ResNet-50 at 224: the
    selection peaked at 11 GB scoring 51 images at once)."""
    from onnx_snn_runtime import Simulator

    from .passes.tune_thresholds import images_within, state_bytes

    batch_size = min(batch_size, images_within(SCORE_MEMORY, state_bytes(record.states)))
    sim = Simulator(model.SerializeToString(), "cpu")
    n = len(next(iter(feeds.values())))
    out = np.concatenate([sim.run({k: v[i:i + batch_size] for k, v in feeds.items()}, T, per_step=False)
                          for i in range(0, n, batch_size)]).astype(np.float64)
    return float(np.mean(_predictions(out) == expected)), float(np.mean((out - reference) ** 2))
