"""Which operators the converter maps faithfully, and the check that refuses everything else.

A node *carries activations* when one of its inputs depends on a graph input through float
data (not only through its shape). Nodes that only compute shapes or constants (Shape, Gather
on shapes, Concat of shape pieces...) are always allowed: they are the same at every timestep.
Nodes that carry activations must be in ``SUPPORTED_OPS`` and used in a supported way; rate
coding is exact for linear and affine ops, and ReLU/Clip(0, c) become neurons.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .errors import ModelWeightsError, UnsupportedOpError
from .graph import const, is_standard
from .op_sets import LINEAR_OPS, MAX_OPS, NEURON_OPS, OUTPUT_ONLY_OPS, SHAPE_OPS, SUPPORTED_OPS  # noqa: F401


def activation_tensors(graph: gs.Graph) -> set[str]:
    """Names of the tensors whose values depend on the graph inputs' data."""
    carrying = {t.name for t in graph.inputs}
    for node in graph.nodes:  # graph is topologically sorted
        if node.op in SHAPE_OPS:
            continue
        if any(t.name in carrying for t in node.inputs if not t.is_empty()):
            carrying.update(t.name for t in node.outputs)
    return carrying


def clip_bounds(node: gs.Node) -> tuple[float | None, float | None]:
    """(min, max) of a Clip node as numbers, None where absent; raises if one is not constant."""
    bounds = []
    for i in (1, 2):
        if len(node.inputs) <= i or node.inputs[i].is_empty():
            bounds.append(None)
            continue
        value = const(node.inputs[i])
        if value is None:
            raise UnsupportedOpError(node.name, node.op, f"has a non-constant {('min', 'max')[i - 1]} bound")
        bounds.append(float(value))
    return bounds[0], bounds[1]


def check_node(node: gs.Node, carrying: set[str]) -> None:
    live = [t for t in node.inputs if not t.is_empty() and t.name in carrying]
    op = node.op
    if not is_standard(node):
        raise UnsupportedOpError(node.name, f"{node.domain}.{op}", "is in a custom domain")
    if op not in SUPPORTED_OPS:
        raise UnsupportedOpError(node.name, op, "has no SNN equivalent in onnx-snn")
    if op in ("Conv", "ConvTranspose", "Gemm") and any(t.name in carrying for t in node.inputs[1:] if not t.is_empty()):
        raise UnsupportedOpError(node.name, op, "has weights or bias computed from the input; "
                                 "only constant weights can be converted")
    if op in ("MatMul", "Mul") and len(live) > 1:
        raise UnsupportedOpError(node.name, op, "multiplies two activations, which is not linear")
    if op == "Div" and node.inputs[1].name in carrying:
        raise UnsupportedOpError(node.name, op, "divides by an activation, which is not linear")
    if op == "Clip":
        lo, hi = clip_bounds(node)
        if lo != 0.0:
            raise UnsupportedOpError(node.name, op, f"has min {lo}; only Clip with min 0 "
                                     "(ReLU, ReLU6) becomes a neuron")
        if hi is not None and hi <= 0:
            raise UnsupportedOpError(node.name, op, f"has max {hi} <= 0, so it never activates")
    if op in MAX_OPS | {"Dropout", "BatchNormalization"} and sum(bool(t.outputs) for t in node.outputs[1:]):
        raise UnsupportedOpError(node.name, op, "has its second output (indices, mask or running "
                                 "statistics) in use; export the model in eval mode without it")
    if op in OUTPUT_ONLY_OPS:
        raise UnsupportedOpError(node.name, op, "is only supported directly before a graph output, "
                                 "where it is dropped (argmax of summed logits is unchanged)")


# constant inputs where an infinite value is legitimate: Clip's bounds, Pad's fill value
_MAY_BE_INFINITE = {"Clip": {1, 2}, "Pad": {2}}


def check_weights(node: gs.Node) -> None:
    """Refuse a node whose constant inputs (weights, bias, scales) hold NaN or Inf (an infinite
    Clip bound or Pad value is fine; NaN never is)."""
    for i, t in enumerate(node.inputs):
        value = const(t) if not t.is_empty() else None
        if value is not None and i in _MAY_BE_INFINITE.get(node.op, ()):
            value = np.where(np.isinf(value), 0, value) if np.issubdtype(value.dtype, np.floating) else value
        if value is not None and np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int(np.size(value) - np.isfinite(value).sum())
            raise ModelWeightsError(f"node {node.name!r} (op {node.op}): its constant input {t.name!r} holds "
                                    f"{bad} NaN or Inf value(s) of {np.size(value)}; the model's weights are "
                                    "broken: retrain or re-export it")


def check_graph(graph: gs.Graph) -> None:
    """Raise ``UnsupportedOpError`` for the first node the converter cannot map faithfully, and
    ``ModelWeightsError`` for one whose weights are not finite."""
    carrying = activation_tensors(graph)
    for node in graph.nodes:
        if any(t.name in carrying for t in node.inputs if not t.is_empty()):
            check_node(node, carrying)
            check_weights(node)
