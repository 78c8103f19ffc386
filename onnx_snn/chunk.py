"""The chunk model: the runtime form's body rewritten to advance K timesteps in one call.

Input ``snn.steps`` (int64, shape [K]; only its length is read) sets K at every call, so one
model serves any chunk length. Inside, every tensor that varies over time is K steps stacked
time-major along the batch axis ([K*N, ...]: rows t*N .. t*N+N-1 are step t), so each
stateless layer runs once on K*N samples, as SpikingJelly's multi-step mode does:

* a neuron fed by the constant boundary (the prefix's output) becomes ``IFNeuronSeqConst``,
  which reads that current once; any other consumer of a boundary tensor reads it repeated K
  times (``Tile``);
* every other ``IFNeuron`` becomes ``IFNeuronSeq``;
* a sequence op whose spikes feed only an AveragePool (window = stride, no padding) takes the
  pool in: ``IFNeuronSeqAvgPool`` / ``IFNeuronSeqConstAvgPool`` (``ops/if_neuron_pool.py``);
* a running-max pool takes ``CumSum`` over [m, x_1, ..., x_K] (the same additions, in the same
  order, as K steps of ``m + x``), pools all K+1 sums at once and subtracts neighbours;
* each output y gets an accumulator the same way: output ``snn.acc.<y>.steps`` [K, N, ...]
  holds the decoded output after each of the K steps, and ``snn.acc.<y>.next`` the last;
* each neuron layer's spikes are counted per sample and step, by the sequence op itself (its
  ``Count`` output): ``snn.v{k}.spike_count`` [K, N].

States keep their [N, ...] shapes, so chunks chain, with each other and with the body's steps.
Every sum is the step loop's, in its order, so the chunk is exact: ``check_chunk`` runs it
against the body at conversion time and the converter drops a chunk that differs (a graph
that hard-codes its batch size, for instance).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_snn_runtime.format import MEMBRANE, OUTPUT_SUM, STEPS_INPUT, State

from .graph import np_dtype
from .ops import if_neuron, if_neuron_pool, if_neuron_seq
from .record import ConversionRecord

log = logging.getLogger(__name__)


class _Builder:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.steps = gs.Variable(STEPS_INPUT, dtype=np.int64, shape=["K"])
        self._k = None

    def node(self, op: str, name: str, inputs, outputs=None, **attrs) -> gs.Variable:
        out = outputs or [gs.Variable(f"{name}.out")]
        self.graph.nodes.append(gs.Node(op, name, attrs=attrs, inputs=list(inputs), outputs=out))
        return out[0]

    def const(self, name: str, values) -> gs.Constant:
        return gs.Constant(name, np.asarray(values, dtype=np.int64))

    @property
    def k(self) -> gs.Variable:
        """[K] as a 1-D int64 tensor."""
        if self._k is None:
            self._k = self.node("Shape", "snn.chunk.k", [self.steps])
        return self._k

    def time_major(self, x: gs.Tensor, like: gs.Tensor, base: str) -> gs.Variable:
        """``x`` [K*N, ...] viewed as [K, N, ...], with N and the rest from ``like`` [N, ...]."""
        shape = self.node("Concat", f"{base}.tm_shape", [self.k, self.node("Shape", f"{base}.n_shape", [like])], axis=0)
        return self.node("Reshape", f"{base}.time_major", [x, shape], allowzero=1)

    def flat(self, x: gs.Tensor, base: str) -> gs.Variable:
        """``x`` [K, N, ...] flattened to [K*N, ...]. Shapes are spelled out (no -1) and read
        with ``allowzero``, so that an empty batch (N = 0) keeps its zero."""
        k, n = (self.node("Shape", f"{base}.dim{i}", [x], start=i, end=i + 1) for i in (0, 1))
        rows = self.node("Mul", f"{base}.rows", [k, n])
        tail = self.node("Shape", f"{base}.tail", [x], start=2)
        shape = self.node("Concat", f"{base}.flat_shape", [rows, tail], axis=0)
        return self.node("Reshape", f"{base}.flat", [x, shape], allowzero=1)

    def scan_sum(self, first: gs.Tensor, xs: gs.Tensor, base: str) -> gs.Variable:
        """CumSum over [first, x_1, ..., x_K] along time: [K+1, N, ...]."""
        head = self.node("Unsqueeze", f"{base}.head", [first, self.const(f"{base}.axis0", [0])])
        joined = self.node("Concat", f"{base}.joined", [head, xs], axis=0)
        return self.node("CumSum", f"{base}.cumsum", [joined, self.const(f"{base}.time_axis", 0)])

    def time_slice(self, x: gs.Tensor, start: int, end: int, base: str, outputs=None) -> gs.Variable:
        return self.node("Slice", base, [x, self.const(f"{base}.start", [start]),
                                         self.const(f"{base}.end", [end]), self.const(f"{base}.axes", [0])], outputs)


def build_chunk(body: gs.Graph, boundary: list[str], states: list[State], outputs: list[str],
                record: ConversionRecord) -> gs.Graph:
    """The chunk graph from a copy of ``body`` cut at ``boundary``: inputs boundary + states (no
    accumulators yet) + ``snn.steps``; outputs as in the module doc."""
    graph = body.copy()
    b = _Builder(graph)
    tensors = graph.tensors()
    state_inputs = {s.input for s in states}
    for t in tensors.values():  # batch sizes change: stale inferred shapes would mislead onnxruntime
        if isinstance(t, gs.Variable) and t.name not in state_inputs and t.name not in boundary:
            t.shape = None
    membrane = {s.input: s for s in states if s.kind == MEMBRANE}

    for name in boundary:
        current = tensors[name]
        tiled = None
        for consumer in list(current.outputs):
            if _is_neuron(consumer) and consumer.inputs[0] is current:
                consumer.op = if_neuron_seq.SEQ_CONST
                consumer.inputs.append(b.steps)
                consumer.outputs.append(gs.Variable(f"{consumer.inputs[1].name}.row_count"))
                continue
            if tiled is None:
                ones = b.const(f"{name}.tile_ones", [1] * (len(current.shape) - 1))
                repeats = b.node("Concat", f"{name}.tile_repeats", [b.k, ones], axis=0)
                tiled = b.node("Tile", f"{name}.tile", [current, repeats])
            consumer.inputs[consumer.inputs.index(current)] = tiled
    for node in graph.nodes:
        if _is_neuron(node):
            node.op = if_neuron_seq.SEQ
            node.outputs.append(gs.Variable(f"{node.inputs[1].name}.row_count"))

    for node in list(graph.nodes):
        _fuse_pool(graph, node, membrane)

    for pool in record.running_max:
        _chunk_running_max(graph, b, pool.nodes, pool.state)

    chunk_outputs = [tensors[s.output] for s in states]
    step_outputs = []
    body_tensors = body.tensors()  # the graph's own shapes were cleared above
    for y_name in outputs:
        y = tensors[y_name]
        acc_in = gs.Variable(f"snn.acc.{y_name}", dtype=y.dtype, shape=_batch_shape(body_tensors[y_name]))
        base = f"snn.acc.{y_name}"
        sums = b.scan_sum(acc_in, b.time_major(y, acc_in, base), base)
        steps_out = gs.Variable(f"{base}.steps", dtype=y.dtype,
                                shape=None if acc_in.shape is None else ["K"] + acc_in.shape)
        acc_out = gs.Variable(f"{base}.next", dtype=y.dtype, shape=acc_in.shape)
        b.time_slice(sums, 1, 2**62, f"{base}.each", [steps_out])
        b.node("Squeeze", f"{base}.last", [b.time_slice(sums, -1, 2**62, f"{base}.tail_slice"),
                                           b.const(f"{base}.sq_axis", [0])], [acc_out])
        graph.inputs.append(acc_in)
        chunk_outputs.append(acc_out)
        step_outputs.append(steps_out)

    counts = []
    for node in graph.nodes:
        if node.op in SEQUENCE_OPS and node.inputs[1].name in membrane:
            v = node.inputs[1]
            per_row = node.outputs[2]
            shape = b.node("Concat", f"{v.name}.count_shape", [b.k, b.node("Shape", f"{v.name}.n", [v], end=1)], axis=0)
            count = gs.Variable(f"{v.name}.spike_count", dtype=np_dtype(node.outputs[0]), shape=["K", "N"])
            b.node("Reshape", f"{v.name}.count_steps", [per_row, shape], [count], allowzero=1)
            counts.append(count)
    graph.inputs.append(b.steps)
    for s in states:  # the states' outputs keep their per-sample shapes
        tensors[s.output].shape = ["N"] + list(s.shape[1:]) if s.shape else None
    graph.outputs = chunk_outputs + step_outputs + counts
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return graph


SEQUENCE_OPS = (if_neuron_seq.SEQ, if_neuron_seq.SEQ_CONST, *if_neuron_pool.SCHEMAS)
_POOLED = {unfused: fused for fused, unfused in if_neuron_pool.UNFUSED.items()}


def _fuse_pool(graph: gs.Graph, node: gs.Node, membrane: dict) -> bool:
    """Fold the AveragePool that alone reads a sequence op's spikes into the op; True if done."""
    if node.op not in _POOLED or node.inputs[1].name not in membrane or len(membrane[node.inputs[1].name].shape) != 4:
        return False
    spikes = node.outputs[0]
    pool = spikes.outputs[0] if len(spikes.outputs) == 1 and spikes not in graph.outputs else None
    if pool is None or pool.op != "AveragePool":
        return False
    reason = if_neuron_pool.fusable(pool.attrs)
    if reason:
        log.debug("%s keeps its AveragePool %s apart: %s", node.name, pool.name, reason)
        return False
    pooled, v_next = pool.outputs[0], node.outputs[1]
    _rewire(pool, [], [])
    node.op = _POOLED[node.op]
    node.attrs["kernel_shape"] = [int(k) for k in pool.attrs["kernel_shape"]]
    _rewire(node, list(node.inputs), [pooled, v_next, node.outputs[2]])
    return True


def _is_neuron(node: gs.Node) -> bool:
    return node.op == if_neuron.OP_TYPE and node.domain == if_neuron.DOMAIN


def _batch_shape(t: gs.Tensor):
    return None if t.shape is None else ["N"] + list(t.shape[1:])


def _chunk_running_max(graph: gs.Graph, b: _Builder, names: list[str], state: State) -> None:
    """``Add(m, x) -> m.next; MaxPool(m), MaxPool(m.next); Sub`` over K steps at once."""
    nodes = {n.name: n for n in graph.nodes}
    accumulate, before, after, increase = (nodes[n] for n in names)
    m_in, x = accumulate.inputs
    m_out, y = accumulate.outputs[0], increase.outputs[0]
    base = f"snn.chunk.{state.input}"
    sums = b.scan_sum(m_in, b.time_major(x, m_in, base), base)            # [K+1, N, ...]
    b.node("Squeeze", f"{base}.last", [b.time_slice(sums, -1, 2**62, f"{base}.last_slice"),
                                       b.const(f"{base}.sq_axis", [0])], [m_out])
    pooled = gs.Variable(f"{base}.pooled")
    _rewire(after, [b.flat(sums, f"{base}.sums")], [pooled])
    shape = b.node("Concat", f"{base}.pooled_shape", [
        b.node("Shape", f"{base}.k1_n", [sums], end=2), b.node("Shape", f"{base}.pooled_tail", [pooled], start=1)],
        axis=0)
    by_step = b.node("Reshape", f"{base}.pooled_by_step", [pooled, shape], allowzero=1)
    later = b.time_slice(by_step, 1, 2**62, f"{base}.later")
    earlier = b.time_slice(by_step, 0, -1, f"{base}.earlier")
    _rewire(increase, [later, earlier], [gs.Variable(f"{base}.increase")])
    flat = b.flat(increase.outputs[0], f"{base}.y")
    _rewire(flat.inputs[0], list(flat.inputs[0].inputs), [y])
    _rewire(accumulate, [], [])
    _rewire(before, [], [])


def _rewire(node: gs.Node, inputs: list, outputs: list) -> None:
    node.inputs.clear()
    node.outputs.clear()
    node.inputs.extend(inputs)
    node.outputs.extend(outputs)


def add_functions(model: onnx.ModelProto, reset_mode) -> None:
    """Give a chunk model the bodies of the sequence ops it uses (its IFNeuron body, if any, goes);
    a pooled op's body calls its sequence op, whose body comes too."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    used = {n.op_type for n in model.graph.node if n.domain == if_neuron.DOMAIN}
    sequences = {if_neuron_pool.UNFUSED.get(op, op) for op in used}
    del model.functions[:]
    model.functions.extend(if_neuron_seq.make_function(op, opset, [reset_mode]) for op in sorted(sequences))
    model.functions.extend(if_neuron_pool.make_function(op, opset) for op in sorted(used & set(if_neuron_pool.SCHEMAS)))


def check_chunk(chunk: bytes, body: bytes, boundary: list[str], states: list[State], *, batch: int = 2,
                steps: int = 3, seed: int = 0) -> str | None:
    """Why the chunk model does not compute what ``steps`` calls of the body compute, spike for
    spike (random boundary currents, the states' initial values), or None when it does."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        step = ort.InferenceSession(body, opts, providers=["CPUExecutionProvider"])
        whole = ort.InferenceSession(chunk, opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(seed)
        feeds = {}
        for i in step.get_inputs():
            if i.name in boundary:
                shape = [batch] + [d if isinstance(d, int) else 1 for d in i.shape[1:]]
                dtype = np.float64 if i.type == "tensor(double)" else np.float32
                feeds[i.name] = (rng.standard_normal(shape) * 0.7 + 0.3).astype(dtype)
        start = {s.input: s.initial(batch) for s in states}
        values = start
        expected_steps = {s.input: [] for s in states if s.kind == OUTPUT_SUM}
        counts = {o.name: [] for o in step.get_outputs() if o.name.endswith(".spike_count")}
        names = [o.name for o in step.get_outputs()]
        for _ in range(steps):
            out = dict(zip(names, step.run(None, {**feeds, **values})))
            values = {s.input: out[s.output] for s in states}
            for name in expected_steps:
                expected_steps[name].append(values[name])
            for name in counts:
                counts[name].append(out[name])
        got = dict(zip([o.name for o in whole.get_outputs()],
                       whole.run(None, {**feeds, **start, STEPS_INPUT: np.arange(steps, dtype=np.int64)})))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types
        return f"onnxruntime could not run it ({e})"
    wanted = {s.output: values[s.input] for s in states}
    wanted.update({f"{name}.steps": np.stack(v) for name, v in expected_steps.items()})
    wanted.update({name: np.stack(v) for name, v in counts.items()})
    for name, value in wanted.items():
        if name not in got:
            return f"it has no output {name!r}"
        if got[name].shape != value.shape or not np.array_equal(got[name], value, equal_nan=True):
            return f"its output {name!r} differs from {steps} steps of the body"
    return None
