"""Calibration pass: choose each neuron's activation scale lambda from data.

Runs the (folded) ANN with onnxruntime over the calibration data with every ReLU/Clip output
exposed, streams the statistics (``calibration.stats``: bounded memory whatever the dataset
size), and records per site, in the model's metadata (``onnx_snn.calibration``): lambda (a
scalar, or one value per channel of axis 1), the exact max, and the share of calibration
activations above lambda. The graph itself is unchanged.

Guarantees: every lambda is finite and > 0; for Clip(0, c) (ReLU6) lambda <= c. A layer that
never activated gets lambda = 1 and a warning (its neurons then never fire, like the ReLU);
a dead channel gets the largest lambda of its layer's other channels.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm.auto import tqdm

from ..calibration.data import InputSpec, iterate_batches
from ..calibration.mode import Mode, parse_mode
from ..calibration.search import search_threshold
from ..calibration.stats import StreamingHistogram
from ..errors import CalibrationError, DataError, OptionError
from ..graph import import_graph
from ..model_util import probe_session, with_metadata
from ..support import NEURON_OPS, clip_bounds
from .base import Pass, PassResult

log = logging.getLogger(__name__)
METADATA_KEY = "onnx_snn.calibration"


@dataclass
class Site:
    node: str
    op: str
    output: str
    rank: int | None
    clip_max: float | None


def neuron_sites(model: onnx.ModelProto) -> list[Site]:
    graph = import_graph(model)
    sites = []
    for node in graph.nodes:
        if node.op in NEURON_OPS:
            out = node.outputs[0]
            sites.append(Site(node.name, node.op, out.name, None if out.shape is None else len(out.shape),
                              clip_bounds(node)[1] if node.op == "Clip" else None))
    return sites


class Calibrate(Pass):
    def __init__(self, data, mode="max", *, per_channel: bool = False, batch_size: int = 256,
                 bins: int | None = None, progress: bool = True, target_T: int | None = None,
                 v_init: float = 0.0):
        self.mode: Mode = parse_mode(mode)
        if self.mode.kind == "search" and not target_T:
            raise OptionError('mode="search" chooses lambda for a number of timesteps: give target_T')
        self.target_T, self.v_init = target_T, v_init
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise OptionError(f"batch_size={batch_size!r} must be a positive integer")
        self.data, self.per_channel, self.batch_size = data, per_channel, batch_size
        self.bins, self.progress = bins, progress

    def call(self, model: onnx.ModelProto) -> PassResult:
        sites = neuron_sites(model)
        inits = {t.name for t in model.graph.initializer}
        inputs = [InputSpec.of(i) for i in model.graph.input if i.name not in inits]
        batches, count = iterate_batches(self.data, inputs, self.batch_size)
        if not sites:
            log.warning("the model has no ReLU or Clip: nothing to calibrate, the SNN has no neurons")
        need_hist = self.mode.kind != "max"
        hists: list[StreamingHistogram | None] = [None] * len(sites)
        session = probe_session(model, [s.output for s in sites]) if sites else None
        samples = 0
        for feeds in tqdm(batches, total=count, desc="calibrating", unit="batch", disable=not self.progress,
                          leave=False):
            samples += len(next(iter(feeds.values())))
            if session is None:
                continue
            try:
                activations = session.run([s.output for s in sites], feeds)
            except Exception as e:  # noqa: BLE001 - onnxruntime's own checks of the data
                raise DataError(f"onnxruntime refused the calibration data: {e}") from e
            for i, act in enumerate(activations):
                if hists[i] is None:
                    channels = act.shape[1] if self.per_channel and act.ndim >= 2 else 1
                    hists[i] = StreamingHistogram(channels, self.bins, histogram=need_hist)
                try:
                    hists[i].update(act)
                except ValueError as e:
                    raise CalibrationError(f"layer {sites[i].node} ({sites[i].op}): {e}; the model overflows "
                                           "on this data: check the weights and the input scaling") from e
        layers = [self._scale(site, hist) for site, hist in zip(sites, hists)]
        record = {"mode": str(self.mode), "per_channel": self.per_channel, "samples": samples,
                  "layers": layers}
        return PassResult(with_metadata(model, METADATA_KEY, json.dumps(record)), True)

    def _scale(self, site: Site, hist: StreamingHistogram) -> dict:
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
        return {"node": site.node, "op": site.op, "output": site.output, "lambda": value,
                "max": layer_max, "share_above": share, "dead_channels": int(dead.sum()) if layer_max > 0 else int(lam.size)}
