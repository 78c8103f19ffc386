"""Calibration pass: choose each neuron's activation scale lambda from data.

Runs the (folded) ANN with onnxruntime over the calibration data, streams each ReLU/Clip
output's statistics (``calibration.stats``: bounded memory whatever the dataset size), and
records per site a ``NeuronSite`` in the conversion record: lambda (a scalar, or one value per
channel of axis 1), the exact max, and the share of calibration activations above lambda. The
graph itself is unchanged.

Two ways to gather the statistics, with the same results up to the histograms' bin width:

* the modes that need only the max and the upper tail (max, fractions, percentiles) run a
  probe that computes the max and selects the tail inside the graph (``calibration.probe``):
  the first batch sets a floor per site (a fraction k of its max; for a q-percentile, the
  value with 20 (1 - q) of the batch above it), and only values above the floor reach numpy
  (``stats.TailHistogram``). If the data turns out to put the percentile below a floor, a
  second pass with floor 0 follows (a one-shot iterator gets floor 0 from the start);
* the search mode needs the whole distribution: every activation is binned
  (``stats.StreamingHistogram``).

Guarantees: one site per ReLU/Clip, in topological order; every lambda is finite and > 0; for
Clip(0, c) (ReLU6) lambda <= c. A layer that never activated gets lambda = 1 and a warning
(its neurons then never fire, like the ReLU); a dead channel gets the largest lambda of its
layer's other channels. Calibration inputs that look like unscaled 8-bit images (integers up to
255 in a float array) and lambdas above ``LARGE_LAMBDA`` get a warning: both usually mean
the data is not scaled the way the model was trained.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm.auto import tqdm

from ..calibration import probe
from ..calibration.data import InputSpec, iterate_batches
from ..calibration.search import search_threshold
from ..calibration.stats import StreamingHistogram, TailHistogram
from ..errors import CalibrationError, DataError
from ..graph import import_graph
from ..model_util import cpu_session, probe_session
from ..options import ConvertOptions
from ..record import Calibration, ConversionRecord, NeuronSite
from ..support import NEURON_OPS, clip_bounds
from .base import ContractError, Pass, PassResult

log = logging.getLogger(__name__)

# A lambda above this is far outside what networks fed inputs in [0, 1] or standardised inputs
# produce; it usually means unscaled data (a warning, not an error: the data may be right).
LARGE_LAMBDA = 1000.0


# For a q-percentile the first batch's floor leaves FLOOR_TAIL * (1 - q) of its values above it
FLOOR_TAIL = 20


@dataclass
class Site:
    node: str
    op: str
    output: str
    rank: int | None
    clip_max: float | None
    channels: int | None = None  # static size of axis 1, if known


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with inferred value_info (ranks, channel counts, element types); a model from
    Canonicalize has them already."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - inference is a help here, not a requirement
        log.debug("shape inference failed (%s); sites of unknown shape use the dense statistics", e)
        return model


def neuron_sites(model: onnx.ModelProto) -> list[Site]:
    """The ReLU/Clip sites, with rank and channels where ``model``'s value_info has them
    (``with_shapes`` fills it in)."""
    graph = import_graph(model)
    sites = []
    for node in graph.nodes:
        if node.op in NEURON_OPS:
            out = node.outputs[0]
            shape = out.shape
            channels = shape[1] if shape is not None and len(shape) >= 2 and isinstance(shape[1], int) else None
            sites.append(Site(node.name, node.op, out.name, None if shape is None else len(shape),
                              clip_bounds(node)[1] if node.op == "Clip" else None, channels))
    return sites


def _reiterable(data) -> bool:
    """Whether a second pass over the data is possible (arrays, paths, lists, DataLoaders: yes;
    generators and other iterators: no)."""
    return not isinstance(data, Iterator)


class Calibrate(Pass):
    def __init__(self, data, options: ConvertOptions | str | None = None, **given):
        """``options``: the converter's options (or a mode, with other options as keywords)."""
        options = ConvertOptions.of(options, **given)
        self.data, self.options = data, options
        self.mode, self.per_channel, self.batch_size = options.mode, options.per_channel, options.batch_size
        self.bins, self.progress = options.bins, options.progress
        self.target_T, self.v_init = options.target_T, options.v_init
        self._inputs_seen = _InputRange()

    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        shaped = with_shapes(model)
        sites = neuron_sites(shaped)
        inits = {t.name for t in model.graph.initializer}
        inputs = [InputSpec.of(i) for i in model.graph.input if i.name not in inits]
        if not sites:
            log.warning("the model has no ReLU or Clip: nothing to calibrate, the SNN has no neurons")
            _, samples = self._dense(model, inputs, sites)
            hists = []
        elif self._tail_mode() and all(s.rank is not None for s in sites) and (
                not self.per_channel or all(s.channels is not None or s.rank < 2 for s in sites)):
            hists, samples = self._tails(shaped, inputs, sites)
        else:
            hists, samples = self._dense(model, inputs, sites)
        record.sites = [self._scale(site, hist) for site, hist in zip(sites, hists)]
        record.calibration = Calibration(str(self.mode), self.per_channel, samples)
        self._warn_if_unscaled(record.sites)
        return PassResult(model, False, record)

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        expected = [s.node for s in neuron_sites(model)]
        if [s.node for s in record.sites] != expected:
            raise ContractError(f"sites {[s.node for s in record.sites]} are not the graph's {expected}")
        for site in record.sites:
            lam = np.asarray(site.lam, dtype=np.float64)
            if not (np.isfinite(lam).all() and (lam > 0).all()):
                raise ContractError(f"{site.node}: lambda {site.lam} is not finite and positive")
            if site.clip_max is not None and (lam > site.clip_max).any():
                raise ContractError(f"{site.node}: lambda {site.lam} exceeds its Clip's max {site.clip_max}")

    def _warn_if_unscaled(self, sites: list[NeuronSite]) -> None:
        seen = self._inputs_seen
        if not sites:
            return
        node, top = max(((s.node, float(np.max(s.lam))) for s in sites), key=lambda p: p[1])
        if seen.integral and 1.5 < seen.max <= 255:
            log.warning("the calibration inputs hold only whole numbers up to %g, like unscaled 8-bit images, and "
                        "give lambda up to %.4g (%s); if the model was trained on inputs in [0, 1], divide the "
                        "data by 255", seen.max, top, node)
        elif top > LARGE_LAMBDA:
            log.warning("layer %s: lambda %.4g is far above the usual range (the calibration inputs reach %g); "
                        "check that the data is scaled as the model was trained", node, top, seen.max)

    def _tail_mode(self) -> bool:
        """Whether the probe pays: fractions, and percentiles whose first-batch tail
        (FLOOR_TAIL * (1 - q)) is at most 5 % of the values. Measured on the sample CNN, 20 000
        images, 2 cores (probe against dense): 0.2 x max 1.21 s / 3.60 s, 99.9 % 1.14 / 3.57,
        but 99 % 4.03 / 3.65 and max 0.54 / 0.44 (the dense path needs no histogram for max)."""
        if self.mode.kind == "percentile":
            return FLOOR_TAIL * (1.0 - self.mode.value / 100.0) <= 0.05
        return self.mode.kind == "fraction"

    def _batches(self, inputs):
        batches, count = iterate_batches(self.data, inputs, self.batch_size)
        seen = tqdm(batches, total=count, desc="calibrating", unit="batch", disable=not self.progress, leave=False)
        return (self._inputs_seen.update(feeds) for feeds in seen)

    def _run(self, session, outputs, feeds):
        try:
            return session.run(outputs, feeds)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own checks of the data
            raise DataError(f"onnxruntime refused the calibration data: {e}") from e

    @staticmethod
    def _overflow(site: Site, e: ValueError) -> CalibrationError:
        return CalibrationError(f"layer {site.node} ({site.op}): {e}; the model overflows on this data: check "
                                "the weights and the input scaling")

    def _dense(self, model, inputs, sites) -> tuple[list[StreamingHistogram], int]:
        """Every activation leaves onnxruntime and is binned (the search mode's whole distribution)."""
        hists: list[StreamingHistogram | None] = [None] * len(sites)
        session = probe_session(model, [s.output for s in sites]) if sites else None
        samples = 0
        for feeds in self._batches(inputs):
            samples += len(next(iter(feeds.values())))
            if session is None:
                continue
            for i, act in enumerate(self._run(session, [s.output for s in sites], feeds)):
                if hists[i] is None:
                    channels = act.shape[1] if self.per_channel and act.ndim >= 2 else 1
                    hists[i] = StreamingHistogram(channels, self.bins, histogram=self.mode.kind != "max")
                try:
                    hists[i].update(act)
                except ValueError as e:
                    raise self._overflow(sites[i], e) from e
        return hists, samples

    def _tails(self, model, inputs, sites) -> tuple[list[TailHistogram], int]:
        """The max and the tail above a floor, computed inside the graph (``calibration.probe``)."""
        psites = [probe.ProbeSite(s.output, s.channels if self.per_channel and s.rank >= 2 else 1, s.rank)
                  for s in sites]
        tails = self.mode.kind != "max"
        model_probe, outputs, floor_inputs = probe.build(model, psites, tails)
        session = cpu_session(model_probe)
        dtypes = {i.name: np.float16 if i.type == "tensor(float16)" else np.float64 if i.type == "tensor(double)"
                  else np.float32 for i in session.get_inputs()}
        hists, samples = self._tail_pass(session, outputs, floor_inputs, dtypes, inputs, sites, psites,
                                         choose_floor=tails and _reiterable(self.data))
        if self.mode.kind == "percentile" and not all(h.covers(self.mode.value / 100.0).all() for h in hists):
            log.info("the calibration data put a percentile below the first batch's floor: second pass with floor 0")
            hists, samples = self._tail_pass(session, outputs, floor_inputs, dtypes, inputs, sites, psites,
                                             choose_floor=False)
        return hists, samples

    def _tail_pass(self, session, outputs, floor_inputs, dtypes, inputs, sites, psites, choose_floor: bool):
        hists: list[TailHistogram | None] = [None] * len(sites)
        floors = {name: np.zeros(p.channels, dtypes[name]) for name, p in zip(floor_inputs, psites)}
        samples = 0
        for feeds in self._batches(inputs):
            samples += len(next(iter(feeds.values())))
            values = dict(zip(outputs, self._run(session, outputs, {**feeds, **floors})))
            for i, (site, ps) in enumerate(zip(sites, psites)):
                batch_max = np.asarray(values[f"{ps.key}.max"], np.float64).reshape(-1)
                tail = values.get(f"{ps.key}.tail", np.zeros(0, np.float32)).astype(np.float64)
                channel = values.get(f"{ps.key}.channel")
                per_channel = int(np.prod(values[f"{ps.key}.shape"])) // ps.channels
                finite = bool(np.isfinite(values[f"{ps.key}.sum"]))
                if hists[i] is None:
                    floor = np.full(ps.channels, np.inf)
                    if floor_inputs:
                        floor = self._floor(tail, channel, per_channel, batch_max, ps.channels) if choose_floor \
                            else np.zeros(ps.channels)
                        floor = self._as_type(floor, dtypes[floor_inputs[i]])
                        floors[floor_inputs[i]] = floor.astype(dtypes[floor_inputs[i]])
                        keep = tail > floor[channel if channel is not None else 0]
                        tail, channel = tail[keep], None if channel is None else channel[keep]
                    hists[i] = TailHistogram(floor, self.bins)
                try:
                    hists[i].update(tail, channel, per_channel, batch_max, finite)
                except ValueError as e:
                    raise self._overflow(site, e) from e
        return hists, samples

    @staticmethod
    def _as_type(floor: np.ndarray, dtype) -> np.ndarray:
        """The floor as the graph compares it (rounded down to the activations' type), in float64."""
        rounded = floor.astype(dtype)
        rounded = np.where(rounded.astype(np.float64) > floor, np.nextafter(rounded, dtype(-np.inf)), rounded)
        return np.maximum(rounded.astype(np.float64), 0.0)

    def _floor(self, tail, channel, per_channel: int, batch_max: np.ndarray, channels: int) -> np.ndarray:
        """The first batch's floor per channel (see the module docstring); 0 where the tail is too
        thin. Just below the chosen value, so that values tied with it (a saturated Clip, a
        constant layer, the max itself) are in the tail."""
        if self.mode.kind == "fraction":
            return np.maximum(self.mode.value * batch_max, 0.0)
        keep = int(np.ceil(FLOOR_TAIL * (1.0 - self.mode.value / 100.0) * per_channel))
        floor = np.zeros(channels)
        for c in range(channels):
            values = tail if channel is None else tail[channel == c]
            if 0 < keep < len(values) or keep == 0 and len(values):
                k = len(values) - max(keep, 1)
                floor[c] = np.nextafter(np.partition(values, k)[k], -np.inf)
        return floor

    def _scale(self, site: Site, hist: StreamingHistogram) -> NeuronSite:
        if self.mode.kind == "max":
            lam = hist.max.copy()
        elif self.mode.kind == "percentile":
            lam = hist.quantile(self.mode.value / 100.0)
        elif self.mode.kind == "search":
            lam = search_threshold(hist, self.target_T, self.v_init)
        else:
            lam = hist.max * self.mode.value
        if site.clip_max is not None:
            lam = np.minimum(lam, site.clip_max)
        layer_max = float(hist.max.max())
        dead = lam <= 0
        if layer_max <= 0:
            log.warning("layer %s (%s) never activated on the %d calibration values; using lambda = 1 "
                        "(its neurons will not fire). Check the calibration data.", site.node, site.op, hist.n)
            lam[:] = 1.0
        elif dead.any():
            log.warning("layer %s: %d of %d channels never activated; they get the layer's largest lambda %.4g",
                        site.node, int(dead.sum()), lam.size, float(lam.max()))
            lam[dead] = lam.max()
        if not np.isfinite(lam).all():
            raise CalibrationError(f"layer {site.node}: lambda is not finite ({lam}); the activations "
                                   "overflow; check the model and data")
        share = 0.0 if self.mode.kind == "max" else float(np.mean(hist.share_above(lam)))
        value = float(lam[0]) if lam.size == 1 else [float(v) for v in lam]
        return NeuronSite(site.node, site.op, site.output, value, layer_max, share,
                          int(dead.sum()) if layer_max > 0 else int(lam.size), site.clip_max)


class _InputRange:
    """The largest |value| of the calibration inputs, and whether all were whole numbers."""

    def __init__(self):
        self.max, self.integral = 0.0, True

    def update(self, feeds: dict) -> dict:
        for x in feeds.values():
            if x.size and np.issubdtype(x.dtype, np.floating):
                self.max = max(self.max, float(np.abs(x).max()))
                self.integral = self.integral and bool(np.all(x == np.round(x)))
        return feeds
