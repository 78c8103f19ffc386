"""Scale-folding pass: move the neurons' threshold scaling into the neighbouring weights.

``InsertNeurons`` writes every neuron as ``Mul(1/λ) -> neuron -> Mul(λ)`` (the nodes each
``NeuronSite`` names ``scale_in`` and ``scale_out``), SpikingJelly's VoltageScaler -> IFNode ->
VoltageScaler. Each Mul is a full pass over the layer's activations at every timestep; folded
into a weight it costs nothing. A folded Mul's name is cleared from its site and listed in
``ConversionRecord.folded_scales``; a Mul kept says why in the debug log.

Guarantees: the model computes the same function to float32 rounding (the algebra is done in
float64), state shapes and meanings are unchanged (a membrane still sees z / λ), and a Mul is
folded only where that is exact in exact arithmetic:

* input side: ``scale_in`` whose other operand comes from a Conv, ConvTranspose, Gemm or MatMul
  (through Adds of constants, such as bias correction's shift, which fold into the bias first)
  with constant weights and no other reader: the weights and bias are divided by λ, the same
  folding as BatchNorm's (``passes.fold_batchnorm.fold_into_producer``);
* output side: ``scale_out`` whose output reaches a Conv (group 1), Gemm or MatMul with constant
  weights only through AveragePool, GlobalAveragePool, ReduceMean over spatial axes and Flatten
  (all linear and per channel), each tensor read by that one node: the weights' input channels
  are multiplied by λ.

Everything else keeps its Mul: a scale that reaches a residual Add, a running-max MaxPool, a
graph output or a second reader. Spikes differ from the unfolded model only where a potential
lies within float rounding of the threshold (onnxruntime's own Conv+Mul fusion makes the same
kind of change; ``Simulator(optimize=False)`` does not).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import bypass, const, export_model, import_graph, producer, sole_consumer, unique_name
from ..record import ConversionRecord
from .base import OK, Check, ContractError, Pass, PassResult, fail
from .fold_batchnorm import fold_into_producer

log = logging.getLogger(__name__)

_CHANNEL_LINEAR = ("AveragePool", "GlobalAveragePool", "ReduceMean", "Flatten")


def _const_operand(node: gs.Node) -> tuple[gs.Tensor, np.ndarray] | None:
    """(variable input, constant operand) of a binary node with exactly one constant operand."""
    a, b = node.inputs
    if const(b) is not None and const(a) is None:
        return a, const(b)
    if const(a) is not None and const(b) is None:
        return b, const(a)
    return None


def _per_channel(factor: np.ndarray, tensor: gs.Tensor) -> np.ndarray | None:
    """A constant broadcast against ``tensor`` as a float64 vector along its axis 1, or None when
    it varies along another axis (or the tensor's rank or channel count is unknown)."""
    shape = tensor.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int) or factor.ndim > len(shape):
        return None
    full = factor.reshape((1,) * (len(shape) - factor.ndim) + factor.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != 1) or full.shape[1] not in (1, shape[1]):
        return None
    return np.broadcast_to(full.astype(np.float64).reshape(-1), (shape[1],)).copy()


def _bypassed(graph: gs.Graph, node: gs.Node, keep: gs.Tensor) -> Check:
    return OK if bypass(graph, node, keep) else fail(f"{keep.name} is a graph input or output")


def _fold_input(graph: gs.Graph, mul: gs.Node) -> Check:
    operands = _const_operand(mul)
    if operands is None:
        return fail("it does not have exactly one constant operand")
    x, factor = operands
    s = _per_channel(factor, x)
    if s is None:
        return fail("its scale is not per channel")
    for _ in range(8):  # each round folds one constant Add (a bias shift) into the layer first
        check = fold_into_producer(graph, x, mul, s, np.zeros_like(s))
        if check:
            return _bypassed(graph, mul, x)
        add = producer(x)
        shift = _const_operand(add) if add is not None and add.op == "Add" else None
        if shift is None or sole_consumer(graph, x) is not mul:
            return check
        inner, value = shift
        t = _per_channel(value, x)
        if t is None:
            return fail(f"the shift {add.name} is not per channel")
        check = fold_into_producer(graph, inner, add, np.ones_like(s), t)
        if not check:
            return check
        bypass(graph, add, inner)
        x = inner
    return fail("more than 8 constant Adds before it")


def _reduces_spatial_axes(node: gs.Node, rank: int) -> bool:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and not node.inputs[1].is_empty():
        axes = const(node.inputs[1])
    if axes is None:
        return False
    return all(int(a) % rank >= 2 for a in np.asarray(axes).reshape(-1))


def _fold_output(graph: gs.Graph, mul: gs.Node) -> Check:
    operands = _const_operand(mul)
    if operands is None:
        return fail("it does not have exactly one constant operand")
    spikes, factor = operands
    y = mul.outputs[0]
    lam = _per_channel(factor, y)
    if lam is None:
        return fail("its scale is not per channel")
    t, per_feature = y, lam  # per_feature: the factor along axis 1 of t
    while True:
        reader = sole_consumer(graph, t)
        if reader is None:
            return fail(f"{t.name} has several readers or is a graph output")
        out = reader.outputs[0]
        if reader.op in _CHANNEL_LINEAR:
            shape = t.shape
            if shape is None or out.shape is None:
                return fail(f"{reader.name}'s shapes are unknown")
            if reader.op == "Flatten":
                if int(reader.attrs.get("axis", 1)) != 1 or not all(isinstance(d, int) for d in shape[2:]):
                    return fail(f"{reader.name} does not flatten static dims from axis 1")
                per_feature = np.repeat(per_feature, int(np.prod(shape[2:], dtype=np.int64)))
            elif reader.op == "ReduceMean" and not _reduces_spatial_axes(reader, len(shape)):
                return fail(f"{reader.name} reduces a non-spatial axis")
            t = out
            continue
        if reader.inputs[0] is not t:
            return fail(f"{t.name} reaches {reader.op} {reader.name} but not as its data input")
        return _scale_weight_inputs(graph, reader, per_feature, mul, spikes)


def _scale_weight_inputs(graph: gs.Graph, layer: gs.Node, lam: np.ndarray, mul: gs.Node, spikes: gs.Tensor) -> Check:
    """W' = W * λ along the layer's input features; then the Mul is bypassed."""
    w = const(layer.inputs[1]) if len(layer.inputs) > 1 else None
    if w is None:
        return fail(f"{layer.op} {layer.name} has no constant weight")
    w64 = w.astype(np.float64)
    if layer.op == "Conv" and int(layer.attrs.get("group", 1)) == 1 and w.ndim >= 3 and w.shape[1] == len(lam):
        w_new = w64 * lam.reshape((1, -1) + (1,) * (w.ndim - 2))
    elif layer.op == "Gemm" and not layer.attrs.get("transA", 0) and w.ndim == 2:
        trans = bool(layer.attrs.get("transB", 0))
        if w.shape[1 if trans else 0] != len(lam):
            return fail(f"{layer.name}'s weight does not match the scale's length")
        w_new = w64 * (lam[None, :] if trans else lam[:, None])
    elif layer.op == "MatMul" and w.ndim == 2 and w.shape[0] == len(lam) and len(layer.outputs[0].shape or ()) == 2:
        w_new = w64 * lam[:, None]
    else:
        return fail(f"{layer.op} {layer.name} is not a group-1 Conv, a Gemm without transA or a 2-D MatMul")
    with np.errstate(over="ignore"):  # an overflow to inf is detected after the pass (FoldScales.call)
        scaled = np.ascontiguousarray(w_new.astype(w.dtype))
    layer.inputs[1] = gs.Constant(unique_name(graph, f"{layer.name}.weight_scaled"), scaled)
    return _bypassed(graph, mul, spikes)


def _finite_constants(graph: gs.Graph) -> bool:
    return all(np.isfinite(t.values).all() for t in graph.tensors().values()
               if isinstance(t, gs.Constant) and np.issubdtype(t.values.dtype, np.floating))


class FoldScales(Pass):
    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        graph = import_graph(model)
        if not _finite_constants(graph):
            return PassResult(model, False, record)
        scales = {}  # Mul node name -> (site, its side)
        for site in record.sites:
            scales.update({site.scale_in: (site, "scale_in"), site.scale_out: (site, "scale_out")})
        folded = []
        for mul in [n for n in graph.nodes if n.name in scales and n.op == "Mul"]:  # graph order: the
            site, side = scales[mul.name]  # weights a scale meets are rounded in the same order every time
            check = (_fold_input if side == "scale_in" else _fold_output)(graph, mul)
            if self.check_rewrite(check, f"kept {mul.name}"):
                folded.append((site, side, mul.name))
        if not folded:
            return PassResult(model, False, record)
        if not _finite_constants(graph):
            # a scale of ~1e30 times a large weight overflows float32: keep the Muls instead
            log.warning("folding the neuron scales into the weights would overflow float32; kept as Muls")
            return PassResult(model, False, record)
        for site, side, name in folded:
            setattr(site, side, None)
            record.folded_scales.append(name)
        log.info("folded %d threshold-scaling Muls into weights: %s", len(folded), record.folded_scales)
        return PassResult(export_model(graph, model), True, record)

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        names = {n.name for n in model.graph.node}
        gone = [n for n in record.folded_scales if n in names]
        kept = [n for site in record.sites for n in (site.scale_in, site.scale_out) if n and n not in names]
        if gone or kept:
            raise ContractError(f"folded Muls still in the graph {gone}; recorded Muls missing {kept}")
