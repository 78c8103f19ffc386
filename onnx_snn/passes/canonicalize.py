"""Load-and-canonicalise pass.

Guarantees on the model it returns (its maths unchanged):

* default-domain opset >= 15 (older models are version-converted) and no newer than the
  installed onnxruntime runs (26 for 1.31; newer ones are refused), no custom-domain op left
  from an earlier conversion, no model-local functions (exporter functions are inlined);
* no ``Constant`` nodes: every constant is an initializer; nodes whose inputs are all constant,
  and ``Shape`` of a fully static tensor, are folded;
* no ``Identity`` and no inference-time ``Dropout`` nodes, except one that copies a graph input
  or output to another graph output (both names are the model's interface, so it stays);
* every node has a unique, non-empty name (later passes and error messages refer to it);
* nodes in topological order; a model onnxruntime cannot load, or whose standard ops
  contradict its shapes, is refused here with the reason;
* shapes inferred into ``value_info``; graph input and output names, and their dynamic batch
  dimension, exactly as given.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import helper
from onnx.reference import ReferenceEvaluator

from .. import io
from ..errors import ModelLoadError
from ..graph import bypass, export_model, import_graph, is_standard
from ..ops import if_neuron
from ..record import ConversionRecord
from .base import ContractError, Pass, PassResult, check_sorted

log = logging.getLogger(__name__)

# Folding runs numpy's reference ops; beyond this many output elements we leave the node alone.
_FOLD_LIMIT = 1 << 24


@functools.lru_cache(maxsize=1)
def max_onnx_opset() -> int:
    """The newest default-domain opset the installed onnxruntime runs (26 for 1.31, 21 for 1.20):
    calibration and the runtime would fail deep inside onnxruntime on a newer one."""
    for version in range(onnx.defs.onnx_opset_version(), if_neuron.MIN_ONNX_OPSET - 1, -1):
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)])
        probe.ir_version = 10
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            return version
        except Exception:  # noqa: BLE001 - too new for this onnxruntime
            continue
    return if_neuron.MIN_ONNX_OPSET


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its nodes in topological order (onnxruntime runs unsorted graphs; shape
    inference and the passes need them sorted)."""
    try:
        graph = import_graph(model)
        graph.toposort()
    except gs.util.exception.OnnxGraphSurgeonException as e:
        raise ModelLoadError(f"the graph is malformed: {e}; check it with onnx.checker.check_model") from e
    out = gs.export_onnx(graph, do_type_check=False, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out


def _check_runs(model: onnx.ModelProto) -> None:
    """Refuse up front a model that onnxruntime itself cannot load, with onnxruntime's reason:
    every later pass runs it, and their failures would look like onnx-snn's bugs."""
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        return  # onnxruntime lacks the custom op; CheckSupport refuses it naming node and op
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for invalid models
        raise ModelLoadError(f"onnxruntime cannot run the model: {str(e).strip()[:500]}. Check it with "
                             "onnx.checker.check_model(full_check=True) or re-export it") from e


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise ModelLoadError("the model imports no default-domain opset; it is not a valid ONNX model")


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise ModelLoadError(f"shape inference failed: {e}. Check the model with onnx.checker") from e
    try:  # strict inference also checks every op's input ranks and the shapes the model declares
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except onnx.shape_inference.InferenceError as e:
        # ops without a schema (custom domains) fail strict inference too: CheckSupport names those
        if all(n.domain in ("", "ai.onnx") for n in model.graph.node):
            raise ModelLoadError(f"the model's shapes are inconsistent: {str(e).strip()[:400]}. "
                                 "Fix or re-export it") from e
    return inferred


def _fold_node(node: gs.Node, opset: int) -> list[np.ndarray] | None:
    """Evaluate a node whose inputs are all constant, or None when it should stay."""
    if not is_standard(node) or node.op in ("If", "Loop", "Scan", "RandomNormal",
                                                         "RandomUniform", "RandomNormalLike",
                                                         "RandomUniformLike", "Multinomial"):
        return None
    names = [f"in{i}" if not t.is_empty() else "" for i, t in enumerate(node.inputs)]
    outs = [f"out{i}" for i in range(len(node.outputs))]
    # graphsurgeon imports tensor attributes (ConstantOfShape's value) as Constants
    attrs = {k: onnx.numpy_helper.from_array(np.asarray(v.values)) if isinstance(v, gs.Constant) else v
             for k, v in node.attrs.items()}
    proto = helper.make_node(node.op, names, outs, **attrs)
    feeds = {n: t.values for n, t in zip(names, node.inputs) if n}
    graph = helper.make_graph([proto], "fold",
                              [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                               for n, v in feeds.items()],
                              [helper.make_empty_tensor_value_info(o) for o in outs])
    try:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        values = ReferenceEvaluator(model).run(None, feeds)
    except Exception as e:  # noqa: BLE001 - an op the reference cannot fold simply stays
        log.debug("not folding %s (%s): %s", node.name, node.op, e)
        return None
    if any(np.asarray(v).size > _FOLD_LIMIT for v in values):
        return None
    return [np.asarray(v) for v in values]


def _constant_node_value(node: gs.Node) -> np.ndarray:
    (key, value), = node.attrs.items()
    if key == "value":
        return value.values
    if key == "sparse_value":
        raise ModelLoadError(f"Constant node {node.name!r} holds a sparse tensor; densify it first")
    dtype = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
             "value_ints": np.int64}.get(key)
    if dtype is None:
        return np.array(value)
    return np.array(value, dtype=dtype)


class Canonicalize(Pass):
    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        source = model
        if any(n.domain == if_neuron.DOMAIN for n in model.graph.node):
            raise ModelLoadError("the model already contains onnx_snn neurons (it is an SNN step model); "
                                 "convert the original ANN instead")
        if not model.graph.input:
            raise ModelLoadError("the model has no graph inputs; there is nothing to feed it")
        if model.ByteSize() > io.PROTOBUF_LIMIT:  # every session the converter builds is made from bytes
            raise ModelLoadError(f"the model holds {model.ByteSize() / 2**30:.1f} GiB of weights; onnx-snn converts "
                                 "models up to 2 GiB (its calibration sessions and the step model's runtime form "
                                 "are built from serialized protobuf, which stops at 2 GiB)")
        if model.functions:
            model = onnx.inliner.inline_local_functions(model)
        opset = default_opset(model)
        newest = max_onnx_opset()
        if opset > newest:
            raise ModelLoadError(f"the model uses ai.onnx opset {opset}, newer than onnx-snn runs (at most "
                                 f"{newest}, what the installed onnxruntime {ort.__version__} supports); re-export "
                                 f"it with opset {newest} or older (torch.onnx.export(..., opset_version={newest}))")
        model = _sorted(model)
        _check_runs(model)
        if opset < if_neuron.MIN_ONNX_OPSET:
            try:
                model = onnx.version_converter.convert_version(model, if_neuron.MIN_ONNX_OPSET)
            except Exception as e:  # noqa: BLE001
                raise ModelLoadError(f"the model uses opset {opset} and could not be upgraded to "
                                     f"{if_neuron.MIN_ONNX_OPSET} ({e}); re-export it with opset >= "
                                     f"{if_neuron.MIN_ONNX_OPSET}") from e
            opset = if_neuron.MIN_ONNX_OPSET
        try:
            graph = import_graph(infer_shapes(model))
            graph.toposort()
        except gs.util.exception.OnnxGraphSurgeonException as e:
            raise ModelLoadError(f"the graph is malformed: {e}; check it with onnx.checker.check_model") from e
        names: set[str] = set()
        taken = {n.name for n in graph.nodes if n.name}
        for i, node in enumerate(list(graph.nodes)):
            if node.op == "Constant" and is_standard(node):
                node.outputs[0].to_constant(_constant_node_value(node))
                node.outputs.clear()
                continue
            if node.op in ("Identity", "Dropout") and is_standard(node):
                if len(node.outputs) == 1 or not node.outputs[1].outputs:
                    while len(node.outputs) > 1:
                        node.outputs.pop()
                    if bypass(graph, node, node.inputs[0]):
                        continue
            if node.op == "Shape" and node.inputs[0].shape is not None and all(
                    isinstance(d, int) for d in node.inputs[0].shape):
                shape = np.array(node.inputs[0].shape, dtype=np.int64)
                start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
                node.outputs[0].to_constant(shape[start:end])
                node.outputs.clear()
                continue
            if node.inputs and all(isinstance(t, gs.Constant) or t.is_empty() for t in node.inputs):
                values = _fold_node(node, opset)
                if values is not None:
                    for out, value in zip(node.outputs, values):
                        out.to_constant(value)
                    node.outputs.clear()
                    continue
            if not node.name or node.name in names:
                k = i
                while f"{node.op}_{k}" in taken:
                    k += 1
                node.name = f"{node.op}_{k}"
                taken.add(node.name)
            names.add(node.name)
        graph.cleanup(remove_unused_graph_inputs=False)
        out = export_model(graph, model)
        # Initializers listed as graph inputs (old exporters) are constants, not inputs to feed.
        inits = {t.name for t in out.graph.initializer}
        kept = [i for i in out.graph.input if i.name not in inits]
        del out.graph.input[:]
        out.graph.input.extend(kept)
        out = infer_shapes(out)
        changed = out.SerializeToString(deterministic=True) != source.SerializeToString(deterministic=True)
        return PassResult(out, changed, record)

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        if default_opset(model) < if_neuron.MIN_ONNX_OPSET:
            raise ContractError(f"opset {default_opset(model)} < {if_neuron.MIN_ONNX_OPSET}")
        if model.functions:
            raise ContractError("model-local functions left")
        interface = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
        left = [n.name for n in model.graph.node if n.op_type in ("Constant", "Identity", "Dropout")
                and n.domain in ("", "ai.onnx")
                and not (n.op_type == "Identity" and n.input[0] in interface and n.output[0] in interface)]
        if left:
            raise ContractError(f"Constant/Identity/Dropout nodes left: {left}")
        names = [n.name for n in model.graph.node]
        if "" in names or len(set(names)) != len(names):
            raise ContractError("node names are not unique and non-empty")
        check_sorted(model)
