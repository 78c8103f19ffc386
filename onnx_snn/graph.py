"""Small helpers over onnx-graphsurgeon shared by the passes: import/export that keep the model's
own fields, constant lookup, producer/consumer queries and tensor rewiring."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_snn_runtime.format import OUTPUT_SUM, State

from .errors import OnnxSnnError

# onnxruntime loads IR <= 13 (1.31); we write the smallest IR the model's opsets allow, never below 9
# (model-local function attribute defaults need 9), so older runtimes load our models too.
MIN_IR_VERSION = 9


def ir_version_for(model: onnx.ModelProto) -> int:
    known = [o for o in model.opset_import if o.domain in ("", "ai.onnx", "ai.onnx.ml")]
    try:
        need = helper.find_min_ir_version_for(known, ignore_unknown=True)
    except (TypeError, ValueError):
        need = model.ir_version
    return max(MIN_IR_VERSION, need)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` as a model carrying ``like``'s opset imports, metadata and producer fields."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False, opset_imports=list(like.opset_import))
    model.producer_name, model.producer_version = like.producer_name, like.producer_version
    model.domain, model.model_version, model.doc_string = like.domain, like.model_version, like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    model.ir_version = ir_version_for(model)
    return model


def const(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or folded Constant), else None."""
    return tensor.values if isinstance(tensor, gs.Constant) else None


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The one node reading ``tensor`` when nothing else (another node, a graph output) does."""
    if len(tensor.outputs) != 1 or tensor in graph.outputs:
        return None
    return tensor.outputs[0]


def rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def bypass(graph: gs.Graph, node: gs.Node, keep: gs.Tensor) -> bool:
    """Remove a node whose output equals its input ``keep``: consumers of the output read ``keep``.

    When the output is a graph output, ``keep`` takes over its name so the interface does not
    change. Returns False (and changes nothing) when that is impossible because ``keep`` is a
    graph input or already a graph output.
    """
    out = node.outputs[0]
    if out in graph.outputs:
        if keep in graph.inputs or keep in graph.outputs:
            return False
        keep.name = out.name
        keep.shape, keep.dtype = out.shape or keep.shape, out.dtype or keep.dtype
        graph.outputs[graph.outputs.index(out)] = keep
    for consumer in list(out.outputs):
        consumer.inputs[consumer.inputs.index(out)] = keep
    node.outputs.clear()
    node.inputs.clear()
    return True


def channel_shape(values: np.ndarray, out_rank: int) -> np.ndarray:
    """Reshape a per-channel vector so it broadcasts along axis 1 of a rank-``out_rank`` tensor."""
    return values.reshape((-1,) + (1,) * max(out_rank - 2, 0))


def unique_name(graph: gs.Graph, base: str) -> str:
    taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def is_standard(node: gs.Node) -> bool:
    """True for an op of the default ONNX domain (graphsurgeon reports it as None or '')."""
    return node.domain in (None, "", "ai.onnx")


def np_dtype(tensor: gs.Tensor) -> np.dtype:
    """The tensor's element type, float32 where unknown."""
    return np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)


def state_shape(node_name: str, tensor: gs.Tensor) -> list:
    """The shape of a state holding ``tensor`` per sample: None for the batch axis, ints after."""
    shape = tensor.shape
    if shape is None or not shape or not all(isinstance(d, int) for d in shape[1:]):
        raise OnnxSnnError(f"the output of {node_name!r} has shape {shape}, not known apart from the batch "
                           "dimension, so its state cannot be allocated. Export the model with static "
                           "sizes for all but the batch axis")
    return [None] + [int(d) for d in shape[1:]]


def add_output_sums(graph: gs.Graph, outputs: list[str], sum_name) -> list[State]:
    """For each output ``y`` in ``outputs``, a state pair holding its sum over the steps so far:
    input ``snn.acc.<y>``, output ``sum_name(y)`` = ``snn.acc.<y> + y``, added to the graph's
    inputs and outputs. Returns their ``output_sum`` ``State`` records (zero initial value; shape
    None where ``y``'s non-batch dims are not static). The runtime form's body and the Triton
    export both decode outputs this way."""
    tensors, states = graph.tensors(), []
    for name in outputs:
        y = tensors[name]
        acc_in = gs.Variable(f"snn.acc.{name}", dtype=y.dtype, shape=y.shape)
        acc_out = gs.Variable(sum_name(name), dtype=y.dtype, shape=y.shape)
        graph.nodes.append(gs.Node("Add", f"snn.acc.{name}.add", inputs=[acc_in, y], outputs=[acc_out]))
        graph.inputs.append(acc_in)
        graph.outputs.append(acc_out)
        static = y.shape and all(isinstance(d, int) for d in y.shape[1:])
        shape = [None] + [int(d) for d in y.shape[1:]] if static else None
        states.append(State(acc_in.name, acc_out.name, shape, str(np_dtype(y)), OUTPUT_SUM, name, 0.0))
    return states
