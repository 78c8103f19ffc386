"""The record of a conversion: what each pass did, handed typed from pass to pass.

Passes find the nodes they work on through this record, never by node-name patterns, and
``WriteStepModel`` is the only pass that turns it into ``metadata_props``. A pass receives its
own copy (the manager deep-copies it), updates it and returns it in its ``PassResult``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onnx_snn_runtime.format import State

from .options import ConvertOptions


@dataclass
class NeuronSite:
    """One ReLU/Clip(0, c) that becomes a neuron layer.

    ``Calibrate`` fills the first block; ``InsertNeurons`` names the nodes that implement the
    neuron and its state; ``CorrectBias`` adds its shift; ``FoldScales`` clears a scale node's
    name once the scale lives in the weights.
    ``QuantizedReLUScales`` gives a trained QCFS site its λ, levels and initial potential from the graph.
    """
    node: str                      # the ReLU/Clip of the source (its name is the layer's name)
    op: str
    output: str                    # the tensor the layer outputs (λ × spikes in the step model)
    lam: float | list[float]       # λ: one value, or one per channel (axis 1)
    max: float                     # the largest calibration activation
    share_above: float             # share of calibration activations above λ
    dead_channels: int = 0
    clip_max: float | None = None  # c of Clip(0, c)
    scale_in: str | None = None    # Mul(1/λ) node, None once folded into the producer
    neuron: str | None = None      # IFNeuron node (Clip in the analog model)
    scale_out: str | None = None   # Mul(λ) node, None once folded into the readers
    shift: str | None = None       # bias correction's Add before scale_in
    bias_shift: float | list[float] | None = None
    state: State | None = None     # the membrane state pair (None in the analog model)
    threshold_factor: float | None = None  # TuneThresholds' factor on λ (lam is the tuned value)
    levels: int | None = None      # L of a trained QCFS site (its λ is the graph's, not calibrated)
    v_init: float | None = None    # the site's own initial potential in thresholds (None: the option's)

    def to_json(self) -> dict:
        """The layer's entry in the step model's calibration record (metadata layout v1)."""
        entry = {"node": self.node, "op": self.op, "output": self.output, "lambda": self.lam, "max": self.max,
                 "share_above": self.share_above, "dead_channels": self.dead_channels}
        if self.bias_shift is not None:
            entry["bias_shift"] = self.bias_shift
        if self.threshold_factor is not None:
            entry["threshold_factor"] = self.threshold_factor
        if self.levels is not None:
            entry["trained_levels"] = self.levels
        return entry


@dataclass
class TrainedSite:
    """A quantization-clip-floor-shift activation (QCFS, Bu et al. 2022) that ``QuantizedReLU``
    rewrote as ``Clip(x, 0, λ)``: y = λ/L · clip(floor(x·L/λ + v_init), 0, L)."""
    node: str                      # the Clip that replaced the chain (a neuron site from then on)
    lam: float                     # λ from the graph: the output's scale times L
    levels: int                    # L
    v_init: float                  # the shift before the Floor, in [0, 1): the neuron's initial potential
    nodes: list[str] = field(default_factory=list)  # the source nodes of the chain, in order


@dataclass
class RunningMaxPool:
    """A MaxPool on time-varying signals turned into a running max (``maxpool.running_max``)."""
    node: str                      # the source MaxPool
    nodes: list[str]               # the nodes that replace it
    state: State


@dataclass
class BatchNormFold:
    """What ``FoldBatchNorm`` did with one BatchNormalization."""
    node: str
    into: str | None               # the layer whose weights absorbed it, or None
    affine: list[str] = field(default_factory=list)  # its Mul and Add nodes when not folded


@dataclass
class Calibration:
    mode: str
    per_channel: bool
    samples: int


@dataclass
class ConversionRecord:
    options: ConvertOptions = field(default_factory=ConvertOptions)
    dropped_softmax: list[str] = field(default_factory=list)
    batchnorms: list[BatchNormFold] = field(default_factory=list)
    swapped_maxpools: list[str] = field(default_factory=list)  # MaxPools moved before their neuron
    trained: list[TrainedSite] = field(default_factory=list)  # QCFS activations found in the graph
    calibration: Calibration | None = None
    sites: list[NeuronSite] = field(default_factory=list)     # in topological order
    states: list[State] = field(default_factory=list)         # every state pair, in graph-input order
    running_max: list[RunningMaxPool] = field(default_factory=list)
    folded_scales: list[str] = field(default_factory=list)
    tuning: Any = None             # TuneThresholds' summary (passes.tune_thresholds.Tuning)

    def count(self, kind: str) -> int:
        """States of ``kind`` so far (names the next one: snn.v{k}, snn.m{k})."""
        return sum(s.kind == kind for s in self.states)

    def calibration_json(self) -> dict[str, Any]:
        """The calibration record as the step model stores it (metadata ``onnx_snn.calibration``)."""
        if self.calibration is None:
            return {}
        return {"mode": self.calibration.mode, "per_channel": self.calibration.per_channel,
                "samples": self.calibration.samples, "layers": [s.to_json() for s in self.sites]}
