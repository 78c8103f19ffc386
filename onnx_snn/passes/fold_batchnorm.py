"""BatchNorm folding pass.

Guarantees: the returned model has no ``BatchNormalization`` node and computes the same
function (to float32 rounding; the algebra is done in float64). For y = BN(x) with
s = gamma / sqrt(var + eps) and t = beta - mean * s:

* when x is produced by a Conv, ConvTranspose, Gemm, or MatMul (optionally followed by Add of a
  constant bias) with constant weights, and nothing but the BN reads x, the BN is folded into the
  weights and bias: W' = s * W (along output channels), b' = s * b + t;
* otherwise (BN after Add/Concat/pooling/ReLU, a shared producer output, a bias that varies
  along the batch) it becomes a per-channel affine ``Mul(s) -> Add(t)`` along axis 1.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import ModelLoadError, UnsupportedOpError
from ..graph import bypass, channel_shape, const, export_model, import_graph, producer, rank, sole_consumer, unique_name
from ..record import BatchNormFold, ConversionRecord
from .base import OK, Check, ContractError, Pass, PassResult, fail

log = logging.getLogger(__name__)


def bn_scale_shift(bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) in float64 such that BN(x) = s * x + t per channel."""
    if bn.attrs.get("training_mode", 0):
        raise UnsupportedOpError(bn.name, bn.op, "is in training mode; export the model after model.eval()")
    params = [const(t) for t in bn.inputs[1:5]]
    if any(p is None for p in params):
        raise UnsupportedOpError(bn.name, bn.op, "has non-constant scale, bias, mean or variance")
    if len({p.size for p in params}) != 1 or any(p.ndim != 1 for p in params):
        raise ModelLoadError(f"BatchNormalization {bn.name!r}: scale, bias, mean and variance must be vectors "
                             f"of one length (one value per channel), got shapes {[p.shape for p in params]}; "
                             "the model is malformed")
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    if (var < 0).any():
        raise ModelLoadError(f"BatchNormalization {bn.name!r} has {int((var < 0).sum())} negative variance(s); "
                             "the model is malformed")
    s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return s, beta - mean * s


def _new_const(graph: gs.Graph, base: str, values: np.ndarray, dtype) -> gs.Constant:
    return gs.Constant(unique_name(graph, base), np.ascontiguousarray(values.astype(dtype)))


def _bias(node: gs.Node, index: int, n: int) -> np.ndarray:
    if len(node.inputs) > index and not node.inputs[index].is_empty():
        bias = const(node.inputs[index])
        if bias is None:
            raise UnsupportedOpError(node.name, node.op, "has a bias that is not a constant; only constant "
                                     "weights and biases can be folded and converted")
        bias = bias.astype(np.float64)
        if node.op in ("Conv", "ConvTranspose") and bias.size != n:
            raise ModelLoadError(f"node {node.name!r} ({node.op}) has {n} output channels but a bias of "
                                 f"{bias.size} values; the model is malformed")
        return bias
    return np.zeros(n)


def _set_weight_and_bias(graph, node, weight: np.ndarray, bias: np.ndarray, dtype) -> None:
    """Give a Conv/ConvTranspose/Gemm new constant inputs 1 (weight) and 2 (bias), as ``dtype``.
    New constants rather than edits in place: the old weight may be shared with another node."""
    node.inputs[1] = _new_const(graph, f"{node.name}.weight_bn", weight, dtype)
    bias_const = _new_const(graph, f"{node.name}.bias_bn", bias, dtype)
    if len(node.inputs) > 2:
        node.inputs[2] = bias_const
    else:
        node.inputs.append(bias_const)


def _mismatch(node, channels: int, s: np.ndarray) -> ModelLoadError:
    return ModelLoadError(f"node {node.name!r} ({node.op}) has {channels} output channels, but the per-channel "
                          f"scale applied to its output has {len(s)}; the model is malformed")


def _fold_conv(graph, conv, s, t) -> Check:
    w = const(conv.inputs[1])
    if w is None:
        return fail(f"{conv.name}'s weights are not constant")
    channels = w.shape[0] if conv.op == "Conv" else w.shape[1] * int(conv.attrs.get("group", 1))
    if channels != len(s):
        raise _mismatch(conv, channels, s)
    w64 = w.astype(np.float64)
    if conv.op == "Conv":
        w_new = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
    else:  # ConvTranspose weight: [C_in, C_out / group, k...]
        g = int(conv.attrs.get("group", 1))
        cin, cout_g = w.shape[0], w.shape[1]
        w_new = (w64.reshape((g, cin // g, cout_g) + w.shape[2:])
                 * s.reshape((g, 1, cout_g) + (1,) * (w.ndim - 2))).reshape(w.shape)
    _set_weight_and_bias(graph, conv, w_new, _bias(conv, 2, len(s)) * s + t, w.dtype)
    return OK


def _fold_gemm(graph, gemm, s, t) -> Check:
    b = const(gemm.inputs[1])
    if b is None:
        return fail(f"{gemm.name}'s weights are not constant")
    n = len(s)
    if b.ndim != 2 or b.shape[0 if gemm.attrs.get("transB", 0) else 1] != n:
        raise _mismatch(gemm, b.shape[0 if gemm.attrs.get("transB", 0) else 1] if b.ndim == 2 else -1, s)
    c = _bias(gemm, 2, n) * float(gemm.attrs.get("beta", 1.0))
    if c.ndim == 2 and c.shape[0] != 1 or c.size not in (1, n):
        return fail(f"{gemm.name}'s bias varies along the batch")
    b64 = b.astype(np.float64)
    b_new = b64 * (s[:, None] if gemm.attrs.get("transB", 0) else s[None, :])
    c_new = np.broadcast_to(c.reshape(-1), (n,)) * s + t
    _set_weight_and_bias(graph, gemm, b_new, c_new, b.dtype)
    gemm.attrs["beta"] = 1.0
    return OK


def _fold_matmul(graph, node, s, t) -> Check:
    """MatMul(x, W) or MatMul(x, W) -> Add(b), 2-D output: scale W's columns, fold t into the bias."""
    add = None
    if node.op == "Add":
        add, bias_index = node, next((i for i in (0, 1) if const(node.inputs[i]) is not None), None)
        mm = producer(node.inputs[1 - bias_index]) if bias_index is not None else None
        if mm is None or mm.op != "MatMul" or sole_consumer(graph, mm.outputs[0]) is not add:
            return fail(f"{node.name} is not the sole reader of a MatMul, plus a constant bias")
    if rank(node.outputs[0]) != 2:  # the channel axis is the weight's column axis only for [N, F]
        return fail(f"{node.name}'s output is not 2-D [N, F]")
    if add is not None:
        bias = const(add.inputs[bias_index]).astype(np.float64)
        if bias.size not in (1, len(s)) or bias.ndim > 1 and bias.shape[0] != 1:
            return fail(f"{node.name}'s bias is not per feature")
    else:
        mm, bias = node, np.zeros(1)
    w = const(mm.inputs[1])
    if w is None or w.ndim != 2 or rank(mm.outputs[0]) != 2:
        return fail(f"{mm.name}'s weight is not a constant matrix with a 2-D output")
    if w.shape[1] != len(s):
        raise _mismatch(mm, w.shape[1], s)
    mm.inputs[1] = _new_const(graph, f"{mm.name}.weight_bn", w.astype(np.float64) * s[None, :], w.dtype)
    b_values = np.broadcast_to(bias.reshape(-1), s.shape) * s + t
    if add is None and not b_values.any():
        return OK  # a pure scale (a neuron's input scale): no bias to add
    b_new = _new_const(graph, f"{mm.name}.bias_bn", b_values, w.dtype)
    if add is not None:
        add.inputs[bias_index] = b_new
    else:
        out = gs.Variable(unique_name(graph, f"{mm.name}.out_bn"), dtype=mm.outputs[0].dtype)
        old = mm.outputs[0]
        mm.outputs[0] = out
        graph.nodes.append(gs.Node("Add", f"{mm.name}.bias_add", inputs=[out, b_new], outputs=[old]))
    return OK


_FOLDERS = {"Conv": _fold_conv, "ConvTranspose": _fold_conv, "Gemm": _fold_gemm,
            "MatMul": _fold_matmul, "Add": _fold_matmul}


def fold_into_producer(graph: gs.Graph, x: gs.Tensor, reader: gs.Node, s: np.ndarray, t: np.ndarray) -> Check:
    """Fold the per-channel affine ``s * x + t`` (float64 vectors along axis 1) into the layer
    that produces ``x``, when that is a Conv/ConvTranspose/Gemm/MatMul with constant weights and
    ``reader`` is the only reader of ``x``. Returns whether it did (else why not); the caller
    then bypasses ``reader``. Used for BatchNorm here and for the neurons' input scales
    (``passes.fold_scales``)."""
    prev = producer(x)
    if prev is None:
        return fail(f"{x.name} is a graph input")
    if prev.op not in _FOLDERS:
        return fail(f"{x.name} comes from {prev.op} {prev.name}, not a Conv, ConvTranspose, Gemm or MatMul")
    if sole_consumer(graph, x) is not reader:
        return fail(f"{x.name} has readers other than {reader.name}")
    return _FOLDERS[prev.op](graph, prev, s, t)


def _weighted_layer(node: gs.Node | None) -> gs.Node | None:
    """The node holding the weights a fold changes: ``node``, or the MatMul of a MatMul+Add."""
    if node is not None and node.op == "Add":
        return next((producer(t) for t in node.inputs if producer(t) is not None and producer(t).op == "MatMul"), node)
    return node


def _to_affine(graph, bn, s, t) -> list[str]:
    x = bn.inputs[0]
    r = rank(x)
    if r is None:
        raise UnsupportedOpError(bn.name, bn.op, "has an input of unknown rank, so it can be neither "
                                 "folded nor turned into an affine; give the model static input ranks")
    dtype = const(bn.inputs[1]).dtype
    scaled = gs.Variable(unique_name(graph, f"{bn.name}.scaled"), dtype=bn.outputs[0].dtype, shape=x.shape)
    y = bn.outputs[0]
    scale = _new_const(graph, f"{bn.name}.scale", channel_shape(s, r), dtype)
    shift = _new_const(graph, f"{bn.name}.shift", channel_shape(t, r), dtype)
    mul = gs.Node("Mul", f"{bn.name}.mul", inputs=[x, scale], outputs=[scaled])
    add = gs.Node("Add", f"{bn.name}.add", inputs=[scaled, shift], outputs=[y])
    graph.nodes += [mul, add]
    bn.outputs.clear()
    bn.inputs.clear()
    return [mul.name, add.name]


class FoldBatchNorm(Pass):
    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        graph = import_graph(model)
        bns = [n for n in graph.nodes if n.op == "BatchNormalization"]
        for bn in bns:
            while len(bn.outputs) > 1:
                bn.outputs.pop()  # running statistics of inference-mode exports are unused
            s, t = bn_scale_shift(bn)
            x = bn.inputs[0]
            layer = _weighted_layer(producer(x))  # before the fold, which may add a bias node after it
            check = fold_into_producer(graph, x, bn, s, t)
            if check:
                bypass(graph, bn, x)  # x has no other reader and is no graph input: always possible
                record.batchnorms.append(BatchNormFold(bn.name, layer.name))
                log.info("folded %s into %s", bn.name, layer.name)
            else:
                record.batchnorms.append(BatchNormFold(bn.name, None, _to_affine(graph, bn, s, t)))
                log.info("turned %s into a per-channel affine: %s", bn.name, check.reason)
        if not bns:
            return PassResult(model, False, record)
        return PassResult(export_model(graph, model), True, record)

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        left = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
        if left:
            raise ContractError(f"BatchNormalization left: {left}")

