"""Calibration pass: choose each neuron's activation scale lambda from data.

Runs the (folded) ANN with onnxruntime over the calibration data, streams each ReLU/Clip
output's statistics (``calibration.stats``: bounded memory whatever the dataset size), and
records per site a ``NeuronSite`` in the conversion record: lambda (a scalar, or one value per
channel of axis 1), the exact max, and the share of calibration activations above lambda. The
graph itself is unchanged.

The statistics, with the same results either way up to the histograms' bin width:

* the modes that need only the max and the upper tail (fractions of the max, percentiles whose
  tail is thin) keep only the tail: the first batch sets a floor per site (a fraction k of its
  max; for a q-percentile, the value with 20 (1 - q) of the batch above it), and only the values
  above it are binned (``stats.TailHistogram``). If the data turns out to put the percentile
  below a floor, a second pass with floor 0 follows (a one-shot iterator gets floor 0 from the
  start). The tail is selected in numpy from the dense model's outputs (every site's activation
  exposed), or, with ``DENSE_TAILS = False``, inside the graph by the probe
  (``calibration.probe``): the same values. Numpy is faster (measured on 2 busy cores: the
  sample CNN over 20 000 images, 99.9 % per layer 6.7 s against the probe's 10.3 s, per channel
  9.5 against 18.0, 0.2 x max 18.2 against 21.8; a ResNet-50 at 224 x 224, 5.1 s against 8.0 s
  per batch of 16), the probe lighter (0.35 GB against 0.64 GB there). Batches with floor 0
  (the first, before it is chosen, and the floor-0 passes) always take the dense model: the
  probe would return every positive value with its full index (NonZero: 8 bytes per axis, 3 GB
  for that ResNet-50 batch);
* max and the other modes run the dense model: max keeps the max, the search mode and wide
  percentiles bin every activation (``stats.StreamingHistogram``).

Memory. The dense model exposes every site's activation at once, so one onnxruntime run holds
them all (about 40 MB per image for a ResNet-50 at 224 x 224). Batches whose activations would
exceed ``DENSE_BYTES`` are split into batches that fit (each counts as a batch: the results
are those of a ``batch_size`` equal to the split size, the same up to the histograms' bin width;
below the bound nothing changes), and the dense sessions run without onnxruntime's memory
arena, so their buffers return to the system after each run.

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
from onnx import helper
from tqdm.auto import tqdm

from ..calibration import probe
from ..calibration.data import InputSpec, iterate_batches
from ..calibration.search import search_threshold
from ..calibration.stats import StreamingHistogram, TailHistogram
from ..errors import CalibrationError, DataError
from ..graph import import_graph
from ..model_util import cpu_session
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

# Activation bytes (all sites together) one run of the dense model may return; larger batches are split
DENSE_BYTES = 1 << 30

# Select the tails in numpy from the dense model's outputs (faster), not in the probe (lighter)
DENSE_TAILS = True


@dataclass
class Site:
    node: str
    op: str
    output: str
    rank: int | None
    clip_max: float | None
    channels: int | None = None  # static size of axis 1, if known
    sample_bytes: int | None = None  # bytes of one sample's activation, if its shape is static


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
            static = shape is not None and len(shape) >= 1 and all(isinstance(d, int) for d in shape[1:])
            size = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(out.dtype or np.float32).itemsize \
                if static else None
            sites.append(Site(node.name, node.op, out.name, None if shape is None else len(shape),
                              clip_bounds(node)[1] if node.op == "Clip" else None, channels, size))
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
        self._sample_bytes: int | None = None  # activation bytes per sample, all sites (None: unknown)

    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        shaped = with_shapes(model)
        sites = neuron_sites(shaped)
        inits = {t.name for t in model.graph.initializer}
        inputs = [InputSpec.of(i) for i in model.graph.input if i.name not in inits]
        sizes = [s.sample_bytes for s in sites]
        self._sample_bytes = sum(sizes) if sites and None not in sizes else None
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

    def _batch_limit(self) -> int | None:
        """The most samples one run of the dense model may take (``DENSE_BYTES``), None if unbounded."""
        if not self._sample_bytes:
            return None
        return max(1, DENSE_BYTES // self._sample_bytes)

    def _batches(self, inputs):
        """The calibration batches as feed dicts, split to at most ``_batch_limit()`` samples."""
        batches, count = iterate_batches(self.data, inputs, self.batch_size)
        seen = tqdm(batches, total=count, desc="calibrating", unit="batch", disable=not self.progress, leave=False)
        limit, warned = self._batch_limit(), False
        for feeds in seen:
            self._inputs_seen.update(feeds)
            n = len(next(iter(feeds.values())))
            if limit is None or n <= limit:
                yield feeds
                continue
            if not warned:
                log.info("calibration batches of %d samples hold %.2f GB of activations; running them %d samples "
                         "at a time", n, n * self._sample_bytes / 1e9, limit)
                warned = True
            for start in range(0, n, limit):
                yield {k: v[start:start + limit] for k, v in feeds.items()}

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
        session = probe.dense_session(model, [s.output for s in sites]) if sites else None
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
        """The max and the tail above a floor per site (see the module docstring)."""
        psites = [probe.ProbeSite(s.output, s.channels if self.per_channel and s.rank >= 2 else 1, s.rank)
                  for s in sites]
        types = {v.name: v.type.tensor_type.elem_type for v in
                 list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
        dtypes = [helper.tensor_dtype_to_np_dtype(types.get(s.output, onnx.TensorProto.FLOAT)).type for s in sites]
        hists, samples = self._tail_pass(model, inputs, sites, psites, dtypes, _reiterable(self.data))
        if self.mode.kind == "percentile" and not all(h.covers(self.mode.value / 100.0).all() for h in hists):
            log.info("the calibration data put a percentile below the first batch's floor: second pass with floor 0")
            hists, samples = self._tail_pass(model, inputs, sites, psites, dtypes, choose_floor=False)
        return hists, samples

    def _tail_pass(self, model, inputs, sites, psites, dtypes, choose_floor: bool):
        """One pass over the data; ``choose_floor``: on the first batch, else floor 0. Batches
        run the dense model and select the tail in numpy, except, with ``DENSE_TAILS = False``,
        those after the first of a pass that chose its floors, which run the probe with them."""
        hists: list[TailHistogram | None] = [None] * len(sites)
        floors: list[np.ndarray] = []
        dense_session = session = None
        samples = 0
        for feeds in self._batches(inputs):
            samples += len(next(iter(feeds.values())))
            if DENSE_TAILS or not choose_floor or hists[0] is None:
                if dense_session is None:
                    dense_session = probe.dense_session(model, [s.output for s in sites])
                acts = self._run(dense_session, [s.output for s in sites], feeds)
                for i, (site, ps) in enumerate(zip(sites, psites)):
                    rows = acts[i].reshape(1, -1) if ps.channels == 1 else \
                        np.moveaxis(acts[i], 1, 0).reshape(ps.channels, -1)
                    acts[i] = None
                    batch_max = rows.max(axis=1).astype(np.float64)
                    if hists[i] is None:
                        floor = self._floor(rows, batch_max) if choose_floor else np.zeros(ps.channels)
                        hists[i] = TailHistogram(self._as_type(floor, dtypes[i]), self.bins)
                        floors.append(hists[i].floor.astype(dtypes[i]))
                    above = rows > hists[i].floor[:, None].astype(rows.dtype)
                    channel = None if ps.channels == 1 else np.repeat(np.arange(ps.channels), above.sum(axis=1))
                    self._update(hists[i], site, rows[above], channel, rows.shape[1], batch_max, True)
                if not DENSE_TAILS and choose_floor:
                    dense_session = None  # the probe takes the next batches
                continue
            if session is None:
                model_probe, outputs, floor_inputs = probe.build(model, psites, True)
                session, floors = cpu_session(model_probe), dict(zip(floor_inputs, floors))
                del model_probe
            values = dict(zip(outputs, self._run(session, outputs, {**feeds, **floors})))
            for i, (site, ps) in enumerate(zip(sites, psites)):
                batch_max = np.asarray(values[f"{ps.key}.max"], np.float64).reshape(-1)
                tail = values[f"{ps.key}.tail"]
                channel = values.get(f"{ps.key}.channel")
                per_channel = int(np.prod(values[f"{ps.key}.shape"])) // ps.channels
                finite = bool(np.isfinite(values[f"{ps.key}.sum"]))
                self._update(hists[i], site, tail, channel, per_channel, batch_max, finite)
        return hists, samples

    def _update(self, hist: TailHistogram, site: Site, tail, channel, per_channel: int, batch_max, finite: bool):
        try:
            hist.update(tail, channel, per_channel, batch_max, finite)
        except ValueError as e:
            raise self._overflow(site, e) from e

    @staticmethod
    def _as_type(floor: np.ndarray, dtype) -> np.ndarray:
        """The floor as the graph compares it (rounded down to the activations' type), in float64."""
        rounded = floor.astype(dtype)
        rounded = np.where(rounded.astype(np.float64) > floor, np.nextafter(rounded, dtype(-np.inf)), rounded)
        return np.maximum(rounded.astype(np.float64), 0.0)

    def _floor(self, rows: np.ndarray, batch_max: np.ndarray) -> np.ndarray:
        """The first batch's floor per channel (``rows``: channels x values; see the module
        docstring); 0 where the tail is too thin. Just below the chosen value, so that values
        tied with it (a saturated Clip, a constant layer, the max itself) are in the tail."""
        if self.mode.kind == "fraction":
            return np.maximum(self.mode.value * batch_max, 0.0)
        count = rows.shape[1]
        keep = int(np.ceil(FLOOR_TAIL * (1.0 - self.mode.value / 100.0) * count))
        positive = np.count_nonzero(rows > 0, axis=1)
        if keep == 0:  # the max, where the channel has a positive value
            value, chosen = batch_max, positive > 0
        elif keep < count:  # the keep-th largest value, where more than keep values are positive
            value, chosen = np.partition(rows, count - keep, axis=1)[:, count - keep].astype(np.float64), positive > keep
        else:
            return np.zeros(len(rows))
        return np.where(chosen, np.nextafter(value, -np.inf), 0.0)

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
