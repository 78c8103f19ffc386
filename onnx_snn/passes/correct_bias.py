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
potential, then recording). Recordings are dropped once no later layer reads them, and kept
as one bit per value and one value per channel (``Recording``: the spikes times lambda, bit
for bit; any other output is kept as it is). The shifts go into one copy of the model in place
(``_add_shift``: the graph onnx-graphsurgeon's export would give, node order included).

Memory. The calibration batch is ``samples`` images: at most ``STEP_BUDGET // target_T`` of
them (but ``MIN_SAMPLES`` or more), and no more than fit in ``memory`` bytes (``MEMORY_BUDGET``,
768 MiB): ``plan`` counts per image the largest, over the layers, of the recordings alive (T
steps of one bit per value, and a step of each decoded), the layer's own float64 arrays, its
segment's states and the images; the rescaled ANN's outputs (every layer's, the targets) take
``TARGET_BYTES`` (256 MiB) of it at most, computed a group of layers at a time (``_targets``).
The models of ``models/zoo.py`` keep every image they had (512 at T <= 16, 256 at T = 32:
at most 1.1 MB per image, VGG8 at T = 32). A ResNet-50 at 224 x 224 and T = 8 holds 38.5 MB
per image besides its 38.4 MB of targets, so it is corrected on ``MIN_SAMPLES`` images (logged):
per-channel means over 16 images are still averages over thousands of values at every layer,
the per-neuron potential correction averages over the 16 images only. Models within the budget
get the same corrections as before it, bit for bit.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_snn_runtime.format import MEMBRANE, State

from ..calibration.data import InputSpec, take_samples
from ..calibration.probe import dense_session
from ..errors import OnnxSnnError, OptionError
from ..graph import channel_shape, export_model, import_graph
from ..model_util import probe_session
from ..ops import if_neuron
from ..options import ConvertOptions
from ..record import ConversionRecord, NeuronSite
from .base import ContractError, Pass, PassResult

log = logging.getLogger(__name__)

STEP_BUDGET = 8192  # calibration images x timesteps per simulation
MIN_SAMPLES = 16  # never fewer calibration images, whatever the memory budget
MEMORY_BUDGET = 3 << 28  # bytes the pass may hold in arrays of its images (768 MiB; see plan)
TARGET_BYTES = 1 << 28  # of which the rescaled ANN's outputs held at a time
RUN_BYTES = 1 << 28  # outputs of one onnxruntime run of the rescaled ANN


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
        steps, total = None, None
        for t, value in enumerate(self.steps(feeds, trains, T)):
            if record:
                steps = np.empty((T, *value.shape), value.dtype) if steps is None else steps
                steps[t] = value
            elif total is None:
                total = value.astype(np.float64)
            else:
                total += value
        return steps if record else total / T

    def steps(self, feeds: dict[str, np.ndarray], trains, T: int) -> Iterator[np.ndarray]:
        """``output`` at each of the T steps, one step at a time. ``trains[name][t]``: the
        recorded tensor ``name`` at step t (an array [T, N, ...], or any object indexed so)."""
        session = self.session
        needed = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in needed}
        batch = len(trains[self.trains[0]][0]) if self.trains else len(next(iter(feeds.values())))
        state = {s.input: s.initial(batch) for s in self.states}
        names = [self.output] + [s.output for s in self.states]
        for t in range(T):
            values = session.run(names, {**feeds, **state, **{n: trains[n][t] for n in self.trains}})
            state = {s.input: v for s, v in zip(self.states, values[1:])}
            yield values[0]


class Recording:
    """A layer's output over the steps, as ``Segment.steps`` yields it, indexed by step. Where
    every step holds, per channel (axis 1), only +0 and one value (spikes times lambda), it
    keeps one bit per value and that value (32 times smaller for float32); the step comes back
    bit for bit. Otherwise it keeps the arrays."""

    def __init__(self):
        self.shape: tuple | None = None
        self.dtype: np.dtype | None = None
        self.levels: np.ndarray | None = None  # per channel, broadcast against a step; 0 until it fires
        self.packed: list[np.ndarray] | None = []
        self.raw: list[np.ndarray] = []

    def append(self, step: np.ndarray) -> None:
        if self.shape is None:
            self.shape, self.dtype = step.shape, step.dtype
        if self.packed is not None:
            levels = self._levels(step)
            if levels is not None:
                self.levels = levels
                self.packed.append(np.packbits(step.reshape(-1) != 0))
                return
            self.raw, self.packed = [self[t] for t in range(len(self.packed))], None
        self.raw.append(step)

    def _levels(self, step: np.ndarray) -> np.ndarray | None:
        """The per-channel values with this step, if the step is two-level like the others."""
        if step.ndim < 2 or step.dtype.kind != "f":
            return None
        axes = tuple(i for i in range(step.ndim) if i != 1)
        level = step.max(axis=axes, keepdims=True)
        if not (np.isfinite(level).all() and (level >= 0).all()):  # then 0 x level is +0 and 1 x level is level
            return None
        if self.levels is not None:
            if ((self.levels != 0) & (level != 0) & (self.levels != level)).any():
                return None
            level = np.where(self.levels != 0, self.levels, level)
        unsigned = f"u{step.dtype.itemsize}"
        return level if np.array_equal(self._decode(step != 0, level).view(unsigned), step.view(unsigned)) else None

    @staticmethod
    def _decode(spikes: np.ndarray, level: np.ndarray) -> np.ndarray:
        out = spikes.astype(level.dtype)
        out *= level
        return out

    @property
    def nbytes(self) -> int:
        if self.packed is None:
            return sum(r.nbytes for r in self.raw)
        return sum(p.nbytes for p in self.packed) + (0 if self.levels is None else self.levels.nbytes)

    def __len__(self) -> int:
        return len(self.raw) if self.packed is None else len(self.packed)

    def __getitem__(self, t: int) -> np.ndarray:
        if self.packed is None:
            return self.raw[t]
        return self._decode(np.unpackbits(self.packed[t], count=int(np.prod(self.shape))).reshape(self.shape),
                            self.levels)


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


def replace_neurons(model: onnx.ModelProto, states: list[State], replace) -> onnx.ModelProto:
    """The step model without its IF neurons: ``replace(graph, node, current, spikes)`` adds what
    computes ``spikes`` from ``current`` instead of each; membrane states and every state output
    go. Running-max pools fed zero sums compute a plain MaxPool, so their states stay inputs (fed
    zeros)."""
    graph = import_graph(model)
    membrane = {s.input for s in states if s.kind == MEMBRANE}
    for node in [n for n in graph.nodes if n.op == if_neuron.OP_TYPE]:
        current, spikes = node.inputs[0], node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        replace(graph, node, current, spikes)
    graph.inputs = [t for t in graph.inputs if t.name not in membrane]
    graph.outputs = [t for t in graph.outputs if t.name not in {s.output for s in states}]
    out = export_model(graph, model)
    del out.functions[:]
    return out


def analog_model(model: onnx.ModelProto, states: list[State]) -> onnx.ModelProto:
    """The step model with every IF neuron replaced by Clip(0, 1): the rescaled ANN."""
    def clip(graph, node, current, spikes):
        graph.nodes.append(gs.Node("Clip", f"{node.name}.analog", inputs=[
            current, gs.Constant(f"{node.name}.zero", np.array(0, np.float32)),
            gs.Constant(f"{node.name}.one", np.array(1, np.float32))], outputs=[spikes]))
    return replace_neurons(model, states, clip)


class CorrectBias(Pass):
    def __init__(self, data, options: ConvertOptions | None = None, *, samples: int = 512,
                 memory: int = MEMORY_BUDGET, **given):
        """Bias correction when ``options.bias_correction``, potential correction when
        ``options.potential_correction``, for ``options.target_T`` steps. ``samples``: the most
        calibration images to correct on; fewer where their arrays would exceed ``memory`` bytes
        (never fewer than ``MIN_SAMPLES``; see the module docstring)."""
        options = ConvertOptions.of(options or ConvertOptions(), **given)
        if not options.target_T:
            raise OptionError("bias and potential correction work for a number of timesteps: give target_T")
        self.data, self.T, self.batch_size = data, options.target_T, options.batch_size
        self.samples = min(samples, max(MIN_SAMPLES, STEP_BUDGET // options.target_T))
        self.memory = memory
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

    def _specs(self, model: onnx.ModelProto, states: list[State]) -> list[InputSpec]:
        skip = {t.name for t in model.graph.initializer} | {s.input for s in states}
        return [InputSpec.of(i) for i in model.graph.input if i.name not in skip]

    def _inputs(self, model: onnx.ModelProto, states: list[State], samples: int) -> dict[str, np.ndarray]:
        return take_samples(self.data, model, states, samples, self.batch_size)

    def plan(self, model: onnx.ModelProto, record: ConversionRecord) -> tuple[dict[str, int], int, int]:
        """(the index of the last layer that reads each recorded output, the peak bytes held per
        calibration image, the rescaled ANN's output bytes per image, all layers). The peak is the
        largest over the layers of: the recordings alive at layer k (T steps of one bit per value,
        as ``Recording`` keeps spike trains, and one step of each decoded), the layer's own float64
        mean and difference, the states of its segment (in and out) and the input images. The
        rescaled ANN's outputs come on top, at most ``TARGET_BYTES`` of them at a time (``_targets``)."""
        layers, states = record.sites, record.states
        outputs = [site.output for site in layers]
        boundary = set(outputs)
        graph = import_graph(model)
        size = [_state_bytes(site.state) for site in layers]
        last_use: dict[str, int] = {}  # recording -> index of the last layer that reads it
        segment_states = []
        for k, name in enumerate(outputs):
            seen, fed = ancestry(graph, name, boundary)
            for recorded in fed:
                if outputs.index(recorded) > k:  # Calibrate lists the layers in graph order
                    raise OnnxSnnError(f"bias correction: layer {layers[k].node} reads {recorded}, which "
                                       "comes later in the calibration record; please report this model")
                last_use[recorded] = k
            segment_states.append(sum(_state_bytes(s) for s in states if s.input in seen))
        images = sum(int(np.prod([d or 1 for d in spec.shape[1:]])) * spec.dtype.itemsize
                     for spec in self._specs(model, states))
        peak = 0
        for k in range(len(layers)):
            alive = [j for j in range(k + 1)
                     if last_use.get(outputs[j], -1) > k or (j < k and last_use.get(outputs[j], -1) == k)]
            bits = sum(-(-self.T * size[j] // (8 * np.dtype(layers[j].state.dtype).itemsize)) for j in alive)
            decoded = sum(size[j] for j in alive if j < k)
            peak = max(peak, bits + decoded + 6 * size[k] + 2 * segment_states[k] + images)
        return last_use, peak, sum(size)

    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        if not (self.bias or self.potential):
            return PassResult(model, False, record)
        states, layers = record.states, record.sites
        last_use, per_image, target_bytes = self.plan(model, record)
        budget = max(self.memory - TARGET_BYTES, 0)
        feeds = self._inputs(model, states, min(self.samples, max(MIN_SAMPLES, budget // max(per_image, 1))))
        samples = len(next(iter(feeds.values())))
        log.info("bias correction on %d calibration images (at most %d, and %d MB for the recordings, %.1f MB "
                 "an image at T=%d, but at least %d)", samples, self.samples, budget // 10**6, per_image / 1e6,
                 self.T, MIN_SAMPLES)
        targets = self._targets(model, states, layers, feeds)
        model = _copy(model)  # the shifts go into this copy, in place
        boundary = set(site.output for site in layers)
        trains: dict[str, Recording] = {}
        for k, entry in enumerate(layers):
            target = next(targets)
            part = segment(model, states, entry.output, boundary)
            if self.bias:
                snn = part.run(feeds, trains, self.T, record=False)
                axes = tuple(i for i in range(target.ndim) if i != 1) if target.ndim >= 2 else None
                shift = np.asarray((target - snn).mean(axis=axes), dtype=np.float64)
                del snn, part
                _add_shift(model, entry, shift)
                part = segment(model, states, entry.output, boundary)
                entry.bias_shift = float(shift) if shift.ndim == 0 else [float(v) for v in shift]
                log.info("bias correction %s: mean shift %.4g", entry.node, float(np.mean(shift)))
            if self.potential:
                gap = (target - part.run(feeds, trains, self.T, record=False)).mean(axis=0)
                state = entry.state
                lam = np.asarray(entry.lam, dtype=np.float64)
                lam = channel_shape(lam, gap.ndim + 1) if lam.ndim else lam
                state.init = np.clip(np.asarray(state.init) + self.T * gap / lam, 0.0, 1.0).astype(np.float32)
                del gap
            del target
            if last_use.get(entry.output, -1) > k:
                trains[entry.output] = recording = Recording()
                for step in part.steps(feeds, trains, self.T):
                    recording.append(step)
            del part  # and its session
            for name in [n for n in trains if last_use[n] <= k]:
                del trains[name]
        return PassResult(model, True, record)

    def _targets(self, model: onnx.ModelProto, states: list[State], layers: list[NeuronSite],
                 feeds: dict[str, np.ndarray]) -> Iterator[np.ndarray]:
        """Each layer's output in the rescaled ANN (``analog_model``) on ``feeds``, in order.
        Every run exposes every layer's output, as one run over all images would (onnxruntime
        may optimise a graph differently when fewer tensors are outputs): at most ``RUN_BYTES``
        of them per run, each image on its own (the same values as one run), and the outputs
        of consecutive layers at most ``TARGET_BYTES`` at a time kept, which takes one run over
        the images per such group of layers (one in all for models up to that size)."""
        outputs = [site.output for site in layers]
        samples = len(next(iter(feeds.values())))
        size = [_state_bytes(site.state) for site in layers]
        step = max(1, min(samples, RUN_BYTES // max(sum(size), 1)))
        groups: list[list[int]] = [[]]
        for k, bytes_ in enumerate(size):
            if groups[-1] and samples * (sum(size[j] for j in groups[-1]) + bytes_) > TARGET_BYTES:
                groups.append([])
            groups[-1].append(k)
        if len(groups) > 1:
            log.info("bias correction: the rescaled ANN's outputs (%.0f MB) in %d runs over the %d images",
                     samples * sum(size) / 1e6, len(groups), samples)
        session = dense_session(analog_model(model, states), outputs)
        for group in groups:
            held: list[np.ndarray | None] = [None] * len(group)
            for start in range(0, samples, step):
                part = {k: v[start:start + step] for k, v in feeds.items()}
                n = len(next(iter(part.values())))
                zeros = {s.input: s.initial(n) * 0 for s in states if s.kind != MEMBRANE}
                values = session.run(outputs, {**part, **zeros})
                for i, k in enumerate(group):
                    if held[i] is None:
                        held[i] = np.empty((samples, *values[k].shape[1:]), values[k].dtype)
                    held[i][start:start + n] = values[k]
                del values
            for i in range(len(group)):
                target, held[i] = held[i], None
                yield target


def _state_bytes(state: State) -> int:
    """Bytes of one image's value of a state (or of the layer output it has the shape of)."""
    return int(np.prod([int(d) for d in state.shape[1:]], dtype=np.int64)) * np.dtype(state.dtype).itemsize


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _names_read(node: onnx.NodeProto) -> list[str]:
    """A node's inputs and the names its subgraphs read (graphsurgeon counts both as its inputs)."""
    names = list(node.input)
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in g.node:
                names += _names_read(inner)
    return names


def _toposort(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` (a topological order) in the order onnx-graphsurgeon's ``toposort`` gives them: a
    stable sort by level, a node's level being one more than the highest of its producers'."""
    producer_level: dict[str, int] = {}
    levels = []
    for node in nodes:
        level = 1 + max([producer_level[n] for n in _names_read(node) if n in producer_level] + [-1])
        levels.append(level)
        producer_level.update((o, level) for o in node.output if o)
    return [nodes[i] for i in sorted(range(len(nodes)), key=levels.__getitem__)]


def _add_shift(model: onnx.ModelProto, site: NeuronSite, shift: np.ndarray) -> None:
    """An ``Add(shift)`` between the layer's pre-activation and its ``scale_in``, in ``model`` itself.
    The result is the graphsurgeon export of the model with the Add appended (node order
    included: the Add goes before scale_in, then ``_toposort``), without a round trip of every
    weight through graphsurgeon for every layer."""
    graph = model.graph
    index = next(i for i, n in enumerate(graph.node) if n.name == site.scale_in)
    scale_in = graph.node[index]
    z = scale_in.input[0]
    info = next((v for v in list(graph.value_info) + list(graph.input) + list(graph.output) if v.name == z), None)
    known = info is not None and info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape")
    rank = len(info.type.tensor_type.shape.dim) if known else 2
    base = f"snn.{site.node}"
    value, shifted = f"{base}.bias_shift_value", f"{base}.shifted"
    graph.initializer.append(numpy_helper.from_array(
        np.asarray(channel_shape(shift, rank) if shift.ndim else shift, np.float32), value))
    if info is not None and info.type.HasField("tensor_type"):
        typed = onnx.ValueInfoProto()
        typed.CopyFrom(info)
        typed.name = shifted
        graph.value_info.append(typed)
    add = helper.make_node("Add", [z, value], [shifted], name=f"{base}.bias_shift")
    scale_in.input[0] = shifted
    nodes = list(graph.node)
    nodes.insert(index, add)
    nodes = _toposort(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    site.shift = add.name
