"""Bias-correction pass (Li et al., ICML 2021, "A free lunch from ANN"), for a target T.

Rate coding after few steps is biased: neurons start empty and the rate code floors, so a
layer's mean output falls short of the ANN's, and the shortfall compounds downstream. For
each neuron layer, in topological order, with every upstream layer already spiking and
corrected, this pass simulates the step model for ``target_T`` steps on a calibration batch
and compares, per channel (axis 1), the mean SNN output (sum over t / T) with the mean output
of the rescaled ANN, ``clip(relu(z), 0, lambda)``. The difference is added to the layer's
pre-activation (an ``Add`` before its ``Mul(1/lambda)``): a shift of d raises the rate of an
unsaturated neuron by d / lambda.

With ``potential=True`` (potential correction, same paper) the layer's remaining gap is then
closed neuron by neuron through the initial membrane potential: a neuron whose mean output
falls short by d (mean over the calibration batch) starts ``T * d / lambda`` thresholds
higher, clipped to [0, 1], which adds about d to its output over T steps. The initial
potentials become a per-neuron tensor in the state record.

Guarantee: after the pass, each layer's per-channel mean output on the calibration batch
after ``target_T`` steps is closer to the rescaled ANN's (exactly equal where no neuron of
the channel saturates or sits at zero); each ``NeuronSite`` records its shift (``bias_shift``)
and the ``Add`` node that applies it (``shift``), and its membrane state the initial
potentials. Nothing else changes.

Cost: no layer is re-simulated for the layers downstream of it. Each layer's output over the
T steps (its spike train times lambda) is recorded once it is corrected, and each later layer
runs as a segment of the graph fed with those recordings (``Segment``): the same operations
on the same values as the whole step model, so a layer runs at most three times (bias, then
potential, then recording). Recordings are dropped once no later layer reads them. The
calibration batch is ``samples`` images, at most ``STEP_BUDGET // target_T`` of them (but 16
or more), so a recording holds at most max(STEP_BUDGET, 16 T) images x steps of one layer's
output; a per-channel mean over 16 images is still an average over hundreds of values.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_snn_runtime.format import MEMBRANE, State

from ..calibration.data import InputSpec, iterate_batches
from ..errors import OnnxSnnError, OptionError
from ..graph import channel_shape, export_model, import_graph
from ..model_util import probe_session
from ..ops import if_neuron
from ..options import ConvertOptions
from ..record import ConversionRecord, NeuronSite
from .base import ContractError, Pass, PassResult

log = logging.getLogger(__name__)

STEP_BUDGET = 8192  # calibration images x timesteps per simulation


@dataclass
class Segment:
    """The part of the step model that computes ``output`` from the graph inputs, the recorded
    ``trains`` (tensors fed a new value every step) and the ``states`` it carries."""
    model: onnx.ModelProto
    output: str
    trains: list[str]
    states: list[State]

    @cached_property
    def session(self):
        """One onnxruntime session per segment, however often it runs."""
        return probe_session(self.model, [self.output])

    def run(self, feeds: dict[str, np.ndarray], trains: dict[str, np.ndarray], T: int,
            record: bool) -> np.ndarray:
        """``output`` after each step ([T, N, ...]) with ``record``, else its mean over the T steps."""
        session = self.session
        needed = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in needed}
        batch = len(trains[self.trains[0]][0]) if self.trains else len(next(iter(feeds.values())))
        state = {s.input: s.initial(batch) for s in self.states}
        names = [self.output] + [s.output for s in self.states]
        steps, total = None, None
        for t in range(T):
            values = session.run(names, {**feeds, **state, **{n: trains[n][t] for n in self.trains}})
            state = {s.input: v for s, v in zip(self.states, values[1:])}
            if record:
                steps = np.empty((T, *values[0].shape), values[0].dtype) if steps is None else steps
                steps[t] = values[0]
            total = values[0].astype(np.float64) if total is None else total + values[0]
        return steps if record else total / T


def ancestry(graph: gs.Graph, output: str, boundary: set[str]) -> tuple[set[str], list[str]]:
    """Tensors ``output`` depends on, searching upstream but stopping at ``boundary`` tensors,
    and the boundary tensors reached."""
    tensors = graph.tensors()
    seen, reached, stack = set(), [], [tensors[output]]
    while stack:
        tensor = stack.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        if tensor.name in boundary and tensor.name != output:
            reached.append(tensor.name)
            continue
        for node in tensor.inputs:
            stack.extend(node.inputs)
    return seen, reached


def segment(model: onnx.ModelProto, states: list[State], output: str, boundary: set[str]) -> Segment:
    """The segment computing ``output``, cut at the ``boundary`` tensors (recorded upstream)."""
    graph = import_graph(model)
    tensors = graph.tensors()
    seen, fed = ancestry(graph, output, boundary)
    for name in fed:  # cut its producer: the value comes from the recording
        tensors[name].inputs.clear()
        tensors[name].dtype = tensors[name].dtype or np.float32
    kept = [s for s in states if s.input in seen]
    graph.inputs = [t for t in graph.inputs if t.name in seen] + [tensors[n] for n in fed]
    graph.outputs = [tensors[output]] + [tensors[s.output] for s in kept]
    graph.cleanup()
    return Segment(export_model(graph, model), output, fed, kept)


def analog_model(model: onnx.ModelProto, states: list[State]) -> onnx.ModelProto:
    """The step model with every IF neuron replaced by Clip(0, 1): the rescaled ANN. Running-max
    pools fed zero sums compute a plain MaxPool, so their states stay inputs (fed zeros)."""
    graph = import_graph(model)
    membrane = {s.input for s in states if s.kind == MEMBRANE}
    for node in [n for n in graph.nodes if n.op == if_neuron.OP_TYPE]:
        current, spikes = node.inputs[0], node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.append(gs.Node("Clip", f"{node.name}.analog", inputs=[
            current, gs.Constant(f"{node.name}.zero", np.array(0, np.float32)),
            gs.Constant(f"{node.name}.one", np.array(1, np.float32))], outputs=[spikes]))
    graph.inputs = [t for t in graph.inputs if t.name not in membrane]
    graph.outputs = [t for t in graph.outputs if t.name not in {s.output for s in states}]
    out = export_model(graph, model)
    del out.functions[:]
    return out


class CorrectBias(Pass):
    def __init__(self, data, options: ConvertOptions | None = None, *, samples: int = 512, **given):
        """Bias correction when ``options.bias_correction``, potential correction when
        ``options.potential_correction``, for ``options.target_T`` steps."""
        options = ConvertOptions.of(options or ConvertOptions(), **given)
        if not options.target_T:
            raise OptionError("bias and potential correction work for a number of timesteps: give target_T")
        self.data, self.T, self.batch_size = data, options.target_T, options.batch_size
        self.samples = min(samples, max(16, STEP_BUDGET // options.target_T))
        self.bias, self.potential = options.bias_correction, options.potential_correction

    def requires(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        if any(site.state is None or site.scale_in is None for site in record.sites):
            raise ContractError("CorrectBias needs IF neurons with their input scales (run InsertNeurons with "
                                "neuron='if', before FoldScales)")
        if any(site.shift is not None for site in record.sites):
            raise ContractError("the model's biases are corrected already; CorrectBias runs once per conversion")

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        names = {n.name for n in model.graph.node}
        for site in record.sites:
            if self.bias and (site.shift not in names or site.bias_shift is None):
                raise ContractError(f"{site.node}: no bias shift recorded in the graph")

    def _inputs(self, model: onnx.ModelProto, states: list[State]) -> dict[str, np.ndarray]:
        skip = {t.name for t in model.graph.initializer} | {s.input for s in states}
        specs = [InputSpec.of(i) for i in model.graph.input if i.name not in skip]
        batches, _ = iterate_batches(self.data, specs, self.batch_size)
        taken: dict[str, list] = {s.name: [] for s in specs}
        count = 0
        for feeds in batches:
            for k, v in feeds.items():
                taken[k].append(v)
            count += len(next(iter(feeds.values())))
            if count >= self.samples:
                break
        return {k: np.concatenate(v)[: self.samples] for k, v in taken.items()}

    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        if not (self.bias or self.potential):
            return PassResult(model, False, record)
        states, layers = record.states, record.sites
        outputs = [site.output for site in layers]
        feeds = self._inputs(model, states)
        zeros = {s.input: s.initial(len(next(iter(feeds.values())))) * 0 for s in states if s.kind != MEMBRANE}
        targets = probe_session(analog_model(model, states), outputs).run(outputs, {**feeds, **zeros})
        boundary = set(outputs)
        graph = import_graph(model)
        last_use = {}  # recording -> index of the last layer that reads it
        for k, name in enumerate(outputs):
            for fed in ancestry(graph, name, boundary)[1]:
                if outputs.index(fed) > k:  # Calibrate lists the layers in graph order
                    raise OnnxSnnError(f"bias correction: layer {layers[k].node} reads {fed}, which "
                                       "comes later in the calibration record; please report this model")
                last_use[fed] = k
        trains: dict[str, np.ndarray] = {}
        for k, (entry, target) in enumerate(zip(layers, targets)):
            part = segment(model, states, entry.output, boundary)
            if self.bias:
                snn = part.run(feeds, trains, self.T, record=False)
                axes = tuple(i for i in range(target.ndim) if i != 1) if target.ndim >= 2 else None
                shift = np.asarray((target - snn).mean(axis=axes), dtype=np.float64)
                model = self._add_shift(model, entry, shift)
                part = segment(model, states, entry.output, boundary)
                entry.bias_shift = float(shift) if shift.ndim == 0 else [float(v) for v in shift]
                log.info("bias correction %s: mean shift %.4g", entry.node, float(np.mean(shift)))
            if self.potential:
                gap = (target - part.run(feeds, trains, self.T, record=False)).mean(axis=0)
                state = entry.state
                lam = np.asarray(entry.lam, dtype=np.float64)
                lam = channel_shape(lam, gap.ndim + 1) if lam.ndim else lam
                state.init = np.clip(np.asarray(state.init) + self.T * gap / lam, 0.0, 1.0).astype(np.float32)
            if last_use.get(entry.output, -1) > k:
                trains[entry.output] = part.run(feeds, trains, self.T, record=True)
            for name in [n for n in trains if last_use[n] <= k]:
                del trains[name]
        return PassResult(model, True, record)

    @staticmethod
    def _add_shift(model: onnx.ModelProto, site: NeuronSite, shift: np.ndarray) -> onnx.ModelProto:
        """An ``Add(shift)`` between the layer's pre-activation and its ``scale_in``."""
        graph = import_graph(model)
        scale_in = next(n for n in graph.nodes if n.name == site.scale_in)
        z = scale_in.inputs[0]
        rank = len(z.shape) if z.shape is not None else 2
        base = f"snn.{site.node}"
        shifted = gs.Variable(f"{base}.shifted", dtype=z.dtype, shape=z.shape)
        value = channel_shape(shift, rank) if shift.ndim else shift
        add = gs.Node("Add", f"{base}.bias_shift", inputs=[
            z, gs.Constant(f"{base}.bias_shift_value", np.asarray(value, np.float32))], outputs=[shifted])
        graph.nodes.append(add)
        scale_in.inputs[0] = shifted
        site.shift = add.name
        return export_model(graph, model)
