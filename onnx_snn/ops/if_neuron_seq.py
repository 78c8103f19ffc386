"""The IF neuron over K timesteps in one node: ``onnx_snn.IFNeuronSeq`` and ``onnx_snn.IFNeuronSeqConst``.

``IFNeuronSeq(X, V) -> (S, V_next)`` runs K steps of ``IFNeuron`` (same attributes, same
arithmetic, see ``if_neuron``). ``V`` is ``[N, ...]``; ``X`` and ``S`` are ``[K*N, ...]``,
time-major (rows ``t*N .. t*N+N-1`` are timestep t), the layout in which the stateless layers
around the neuron run all K steps as one batch. ``K = X.shape[0] / V.shape[0]``.

``IFNeuronSeqConst(X, V, Steps) -> (S, V_next)`` is the same fed a constant current: ``X`` is
``[N, ...]`` like ``V`` and every step integrates it; the 1-D ``Steps`` only gives K, its
length (the chunk model's ``snn.steps`` input). The layer right after the constant-input prefix
uses it, so the current is read once and never repeated K times in memory.

Both have a third output, ``Count`` ``[K*N]``: the spikes of each row (sample and step),
summed over the row's neurons; the chunk model reads firing statistics from it. The native
kernels count while the spikes are in registers: free within noise for samples of thousands of
neurons, a few ns per sample and step for samples of ten (a separate ReduceSum re-reads every
spike). In float16 a count is exact up to 2048 (the kernels round the exact count once; numpy's
float16 sum rounds partial sums, so past 2048 the two may differ in the last bits). It is not
optional: onnxruntime's function inlining refuses a node that leaves a function output out.

The module holds, and nothing else repeats: both schemas, the numpy references (``if_seq``,
``if_seq_const``, loops of ``if_neuron.if_step``), ``onnx.reference`` classes, and the
function bodies: a ``Scan`` over time whose body is ``if_neuron.step_nodes``, the very nodes
of IFNeuron's body. A body must handle any K (K is a runtime value), so unrolled steps are not
an option; the native kernels (runtime/kernels/) are the fast form.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx.defs import OpSchema
from onnx.reference.op_run import OpRun

from . import if_neuron
from .if_neuron import DOMAIN, VERSION

SEQ, SEQ_CONST = "IFNeuronSeq", "IFNeuronSeqConst"
_DOCS = dict(zip((SEQ, SEQ_CONST), __doc__.split("\n\n")[1:3]))


def _schema(op: str) -> OpSchema:
    inputs = [OpSchema.FormalParameter("X", "T", "input currents [K*N, ...], time-major" if op == SEQ
                                       else "constant input current [N, ...]"),
              OpSchema.FormalParameter("V", "T", "membrane potentials before the first step [N, ...]")]
    if op == SEQ_CONST:
        inputs.append(OpSchema.FormalParameter("Steps", "I", "1-D; its length is K (values unused)"))
    constraints = [("T", ["tensor(float)", "tensor(double)", "tensor(float16)"], "floating point")]
    if op == SEQ_CONST:
        constraints.append(("I", ["tensor(int64)"], "step indices"))
    return OpSchema(
        op, DOMAIN, VERSION, doc=_DOCS[op], inputs=inputs,
        outputs=[OpSchema.FormalParameter("S", "T", "spikes of the K steps [K*N, ...], time-major"),
                 OpSchema.FormalParameter("V_next", "T", "potentials after the last step [N, ...]"),
                 OpSchema.FormalParameter("Count", "T", "spikes per row (sample and step) [K*N]")],
        type_constraints=constraints,
        attributes=[OpSchema.Attribute(a.name, a, doc) for a, doc in zip(
            if_neuron.function_attributes(),
            ("firing threshold", "0: reset by subtraction; 1: hard reset to v_reset", "potential after a hard reset"))],
    )


SCHEMAS = {op: _schema(op) for op in (SEQ, SEQ_CONST)}
for _schema_ in SCHEMAS.values():
    if not onnx.defs.has(_schema_.name, DOMAIN):
        onnx.defs.register_schema(_schema_)


def steps_of(x: np.ndarray, v: np.ndarray) -> int:
    """K for ``IFNeuronSeq``: the number of timesteps stacked in ``x``."""
    n = v.shape[0]
    if x.shape[1:] != v.shape[1:] or (n == 0 and x.shape[0]) or (n and x.shape[0] % n):
        raise ValueError(f"IFNeuronSeq: X {list(x.shape)} is not K stacked batches of V {list(v.shape)}")
    return x.shape[0] // n if n else 0


def if_seq(x: np.ndarray, v: np.ndarray, threshold: float = 1.0, reset_mode=0,
           v_reset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of ``IFNeuronSeq``: K steps of ``if_step``, spikes stacked time-major."""
    k, n = steps_of(x, v), v.shape[0]
    return _scan([x[t * n:(t + 1) * n] for t in range(k)], v, x.dtype, threshold, reset_mode, v_reset)


def if_seq_const(x: np.ndarray, v: np.ndarray, steps: np.ndarray, threshold: float = 1.0, reset_mode=0,
                 v_reset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of ``IFNeuronSeqConst``: ``len(steps)`` steps of ``if_step`` on the same ``x``."""
    if x.shape != v.shape or np.ndim(steps) != 1:
        raise ValueError(f"IFNeuronSeqConst: X {list(x.shape)} and V {list(v.shape)} must match and "
                         f"Steps must be 1-D, got {list(np.shape(steps))}")
    return _scan([x] * len(steps), v, x.dtype, threshold, reset_mode, v_reset)


def row_counts(s: np.ndarray) -> np.ndarray:
    """The ``Count`` output: spikes per row of ``s`` [rows, ...], in its dtype."""
    return s.reshape(len(s), int(np.prod(s.shape[1:]))).sum(axis=1).astype(s.dtype)


def _scan(currents, v, dtype, threshold, reset_mode, v_reset):
    spikes = []
    for x in currents:
        s, v = if_neuron.if_step(x, v, threshold, reset_mode, v_reset)
        spikes.append(s)
    dtype = np.result_type(dtype, v)
    s = np.concatenate(spikes) if spikes else np.zeros((0,) + v.shape[1:], dtype)
    return s.astype(dtype), v.astype(dtype)


class IFNeuronSeq(OpRun):
    """``onnx.reference`` custom op running ``if_seq``."""

    op_domain = DOMAIN

    def _run(self, x, v, threshold=1.0, reset_mode=0, v_reset=0.0):
        s, v_next = if_seq(x, v, threshold, reset_mode, v_reset)
        return s, v_next, row_counts(s)


class IFNeuronSeqConst(OpRun):
    """``onnx.reference`` custom op running ``if_seq_const``."""

    op_domain = DOMAIN

    def _run(self, x, v, steps, threshold=1.0, reset_mode=0, v_reset=0.0):
        s, v_next = if_seq_const(x, v, steps, threshold, reset_mode, v_reset)
        return s, v_next, row_counts(s)


REFERENCE_OPS = [if_neuron.IFNeuron, IFNeuronSeq, IFNeuronSeqConst]


def make_function(op: str, onnx_opset: int, reset_modes=if_neuron.RESET_MODES) -> onnx.FunctionProto:
    """``op``'s body: the attribute nodes of IFNeuron's body, then a Scan over time whose body is
    IFNeuron's step nodes (reading the threshold tensors from the enclosing scope).

    IFNeuronSeq reshapes X to [K, N, ...] and scans it; IFNeuronSeqConst scans ``Steps`` and
    reads X from the enclosing scope at every step. Scan stacks the spikes as [K, N, ...], which
    a Reshape flattens to [K*N, ...].
    """
    if op not in SCHEMAS:
        raise ValueError(f"unknown sequence op {op!r}; one of {list(SCHEMAS)}")
    if onnx_opset < if_neuron.MIN_ONNX_OPSET:
        raise ValueError(f"{op}'s body needs opset >= {if_neuron.MIN_ONNX_OPSET}, got {onnx_opset}")
    codes = if_neuron.body_codes(reset_modes)
    n = helper.make_node
    # the body serves every element type, so its inputs and outputs carry names only: the
    # types come from the Scan's inputs
    untyped = [onnx.ValueInfoProto(name=name) for name in ("v", "step" if op == SEQ_CONST else "x_t")]
    body = helper.make_graph(
        if_neuron.step_nodes(codes, "X" if op == SEQ_CONST else "x_t", "v", "s_t", "v_t"), f"{op}_step", untyped,
        [onnx.ValueInfoProto(name="v_t"), onnx.ValueInfoProto(name="s_t")])
    nodes = if_neuron.attribute_nodes(codes)
    if op == SEQ:
        # K = rows of X / max(N, 1): shapes spelled out and read with allowzero, so N = 0 works
        nodes += [n("Shape", ["V"], ["v_shape"]),
                  n("Shape", ["V"], ["n"], end=1),
                  n("Shape", ["X"], ["rows"], end=1),
                  n("Constant", [], ["one_i"], value_ints=[1]),
                  n("Max", ["n", "one_i"], ["n_or_one"]),
                  n("Div", ["rows", "n_or_one"], ["k"]),
                  n("Concat", ["k", "v_shape"], ["seq_shape"], axis=0),
                  n("Reshape", ["X", "seq_shape"], ["X_seq"], allowzero=1),
                  n("Scan", ["V", "X_seq"], ["V_next", "S_seq"], num_scan_inputs=1, body=body),
                  n("Shape", ["X"], ["s_shape"])]
    else:
        nodes += [n("Scan", ["V", "Steps"], ["V_next", "S_seq"], num_scan_inputs=1, body=body),
                  n("Shape", ["Steps"], ["k"]),
                  n("Shape", ["X"], ["n"], end=1),
                  n("Shape", ["X"], ["tail"], start=1),
                  n("Mul", ["k", "n"], ["kn"]),
                  n("Concat", ["kn", "tail"], ["s_shape"], axis=0)]
    nodes += [n("Reshape", ["S_seq", "s_shape"], ["S"], allowzero=1),
              n("Flatten", ["S"], ["S_rows"], axis=1),
              n("Constant", [], ["row_axis"], value_ints=[1]),
              n("ReduceSum", ["S_rows", "row_axis"], ["Count"], keepdims=0)]
    inputs = ["X", "V"] + (["Steps"] if op == SEQ_CONST else [])
    fn = helper.make_function(DOMAIN, op, inputs, ["S", "V_next", "Count"], nodes,
                              opset_imports=[helper.make_opsetid("", onnx_opset)], attributes=[])
    fn.attribute_proto.extend(if_neuron.function_attributes())
    fn.doc_string = _DOCS[op]
    return fn
