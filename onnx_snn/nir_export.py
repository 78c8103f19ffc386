"""Export an SNN step model to NIR, the Neuromorphic Intermediate Representation (PyPI ``nir``).

``export_nir(step_model)`` walks the step graph once, in order, and maps each node:

================================================  ===============================================
step model                                        NIR
================================================  ===============================================
graph input (the analog input, fed every step)    ``Input`` (shape without the batch axis)
``Conv`` 2-D, symmetric pads                      ``Conv2d`` (a constant ``Add`` after it: its bias)
``Gemm``; ``MatMul`` (+ a constant ``Add``)       ``Affine``
``onnx_snn.IFNeuron``, reset by subtraction       ``IF`` with ``r`` = 1, ``v_threshold`` = threshold
``AveragePool``, ``GlobalAveragePool``            ``SumPool2d``, its 1/k² folded into the next
                                                  Conv/Affine (``pooling="sum"``, default), or
                                                  ``AvgPool2d`` (``pooling="avg"``)
``Mul`` by a scalar constant                      folded into the next Conv/Affine (or the one
                                                  before), else ``Scale``
``Flatten`` (axis 1), ``Reshape`` to [N, F]       ``Flatten`` over every axis but the batch
``Add`` of two tensors (a residual)               two edges into the consumer: NIR sums a
                                                  node's inputs
graph output                                      ``Output``
================================================  ===============================================

Why sum pooling by default: of the importers checked (docs/nir.md), sinabs and Norse import
``SumPool2d`` but neither ``AvgPool2d`` nor ``Scale``; the divisor folded into the next linear
layer keeps the graph to nodes every one of them reads.

Refused, with the node and the reason (``NirExportError``): a running-max MaxPool (a state NIR
has no node for), a hard reset (NIR 1.0.4's IF resets by subtraction), non-zero initial
membrane potentials unless ``initial_potentials="metadata"`` (NIR has no initial-state field;
with that option each IF node's metadata holds them under ``onnx_snn.v_init`` for the user to
set in the importer), any other op, and attributes NIR cannot express.

Guarantee: the NIR graph computes, step for step, what the step model computes, under NIR
1.0.4's IF (integrate, fire, subtract the threshold), up to float rounding of folded weights
and the spike condition at equality (ours fires at ``v >= threshold``, NIR's at ``>``; the
``onnx_snn.fires_at`` metadata says so). ``tests/test_nir_export.py`` checks it against sinabs
and Norse.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import OnnxSnnError
from .io import load
from .ops import if_neuron

log = logging.getLogger(__name__)

POOLINGS = ("sum", "avg")
INITIAL_POTENTIALS = ("refuse", "metadata")


# What NIR would need for the ops users meet most, for the refusal message.
_MISSING = {
    "MaxPool": "NIR 1.0 has no max-pooling node (it would need one, e.g. a MaxPool2d); train the ANN with "
               "average pooling to export it",
    "Concat": "NIR 1.0 has no concatenation node (edges into a node are summed, not stacked; it would need a "
              "Concat node)",
    "Softmax": "NIR 1.0 has no softmax node",
}

_NO_SCALE = "which sinabs, Norse and snnTorch do not import"


class NirExportError(OnnxSnnError):
    """A step model (or a node of it) that NIR cannot express; the message names it and says why."""


def _nir():
    try:
        import nir
    except ImportError as e:
        raise OnnxSnnError("NIR export needs the nir package: pip install 'onnx-snn[nir]'") from e
    return nir


def export_nir(step_model, *, pooling: str = "sum", initial_potentials: str = "refuse"):
    """The step model (path, bytes or ``onnx.ModelProto``) as a ``nir.NIRGraph``."""
    if pooling not in POOLINGS:
        raise NirExportError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if initial_potentials not in INITIAL_POTENTIALS:
        raise NirExportError(f"initial_potentials must be one of {INITIAL_POTENTIALS}, got {initial_potentials!r}")
    model, _ = load(step_model)
    return _Exporter(model, _nir(), pooling, initial_potentials).graph()


def write_nir(step_model, path: str | os.PathLike, **options):
    """Write the step model in NIR's file format (HDF5) and return the ``nir.NIRGraph``; nothing is
    left at ``path`` on failure. ``options`` as for ``export_nir``."""
    nir, path = _nir(), Path(path)
    graph = export_nir(step_model, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        nir.write(tmp, graph)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return graph


@dataclasses.dataclass
class _Value:
    """A tensor of the step graph as NIR sees it: the sum of ``sources``' outputs, times ``factor``
    (a pending scalar, folded into the next linear layer when there is one)."""
    sources: list[str]
    factor: float = 1.0
    private: bool = False  # one source, whose output reaches this tensor alone (nothing else reads it)


class _Exporter:
    def __init__(self, model: onnx.ModelProto, nir, pooling: str, initial_potentials: str):
        from onnx_snn_runtime.format import StepModelSpec
        self.nir, self.model, self.pooling, self.initial_potentials = nir, model, pooling, initial_potentials
        self.spec = StepModelSpec.from_model(model)
        self.states = {s.input: s for s in self.spec.states}
        self.consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        self.shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                       for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
        self.uses: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.nodes: dict = {}
        self.edges: list[tuple[str, str]] = []
        self.values: dict[str, _Value] = {}
        self.origin: dict[str, str] = {}  # NIR node -> the step-model node it comes from

    def graph(self):
        for value in self.model.graph.input:
            if value.name not in self.states and value.name not in self.consts:
                shape = self._shape(value.name)[1:]
                self.values[value.name] = _Value([self._new("input", self.nir.Input(input_type={"input": np.array(shape)}),
                                                            value.name)])
        for node in self.model.graph.node:
            self._map(node)
        for value in self.model.graph.output:
            if value.name in self.spec.outputs:  # the decoded outputs, not the states
                shape = self._shape(value.name)[1:]
                name = self._new("output", self.nir.Output(output_type={"output": np.array(shape)}), value.name)
                self._connect(self._plain(value.name, name), name)
        return self.nir.NIRGraph(nodes=self.nodes, edges=self.edges, metadata={
            "exported_by": "onnx-snn", "onnx_snn.origin": dict(self.origin),
            "onnx_snn.decoding": json.dumps(self.spec.outputs)})  # JSON: HDF5 keys cannot hold "/"

    # --- bookkeeping ----------------------------------------------------------------------------

    def _new(self, kind: str, nir_node, origin: str) -> str:
        """A new NIR node named ``<kind><k>`` (conv2d0, if1, ...): Python identifiers, which the
        torch.fx-based importers need."""
        k = sum(1 for name in self.nodes if name.rstrip("0123456789") == kind)
        name = f"{kind}{k}"
        self.nodes[name], self.origin[name] = nir_node, origin
        return name

    def _connect(self, value: _Value, target: str) -> None:
        self.edges += [(source, target) for source in value.sources]

    def _input(self, node: onnx.NodeProto, index: int = 0) -> _Value:
        tensor = node.input[index]
        if tensor not in self.values:
            self._refuse(node, f"its input {tensor!r} comes from nothing NIR expresses")
        return self.values[tensor]

    def _plain(self, tensor: str, consumer: str) -> _Value:
        """The value with its pending factor applied (``_rescaled`` to 1), else through a ``Scale``."""
        value = self.values[tensor]
        rescaled = self._rescaled(value, 1.0)
        if rescaled is not None:
            return rescaled
        shape = self._shape(tensor)[1:]
        name = self._new("scale", self.nir.Scale(scale=np.full(shape, value.factor, np.float32)), consumer)
        self._connect(_Value(value.sources), name)
        log.warning("%s: a pending scale exported as Scale (%s), %s", consumer, name, _NO_SCALE)
        return _Value([name])

    def _rescaled(self, value: _Value, factor: float) -> _Value | None:
        """The same tensor with its pending factor changed to ``factor``: the difference folded back
        into the one linear layer that makes it, when nothing else reads that layer; else None."""
        if value.factor == factor:
            return value
        if not self._rescalable(value):
            return None
        layer = self.nodes[value.sources[0]]
        ratio = value.factor / factor
        layer.weight = (layer.weight * ratio).astype(np.float32)
        layer.bias = (layer.bias * ratio).astype(np.float32)
        return _Value(value.sources, factor, value.private)

    def _rescalable(self, value: _Value) -> bool:
        return value.private and hasattr(self.nodes[value.sources[0]], "bias")

    def _emit(self, node: onnx.NodeProto, kind: str, nir_node, inputs: list[_Value], factor: float = 1.0) -> str:
        name = self._new(kind, nir_node, node.name or node.output[0])
        for value in inputs:
            self._connect(value, name)
        self.values[node.output[0]] = _Value([name], factor, self.uses.get(node.output[0], 0) <= 1)
        return name

    def _shape(self, tensor: str) -> list:
        shape = self.shapes.get(tensor)
        if shape is None or any(d is None for d in shape[1:]):
            raise NirExportError(f"tensor {tensor!r} has no static shape past the batch axis; NIR nodes need "
                                 "their shapes: export the ANN with a fixed input size")
        return shape

    def _refuse(self, node: onnx.NodeProto, why: str):
        raise NirExportError(f"node {node.name or node.output[0]!r} ({node.op_type}) cannot be exported to NIR: {why}")

    @staticmethod
    def _attrs(node: onnx.NodeProto) -> dict:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def _const(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
        if len(node.input) <= index or node.input[index] not in self.consts:
            self._refuse(node, f"its {what} is not a constant")
        return self.consts[node.input[index]]

    # --- the mapping: one method per op ---------------------------------------------------------

    def _map(self, node: onnx.NodeProto) -> None:
        if node.domain == if_neuron.DOMAIN and node.op_type == if_neuron.OP_TYPE:
            return self._ifneuron(node)
        if node.domain not in ("", "ai.onnx"):
            self._refuse(node, f"ops of domain {node.domain!r} other than {if_neuron.OP_TYPE} have no NIR "
                         "counterpart (a running-max MaxPool keeps a state, and NIR 1.0 has no max-pooling node "
                         "at all); train the ANN with average pooling to export it")
        handler = getattr(self, f"_{node.op_type.lower()}", None)
        if handler is None:
            self._refuse(node, _MISSING.get(node.op_type, "NIR 1.0 has no counterpart for this op"))
        handler(node)

    def _constant(self, node: onnx.NodeProto) -> None:
        self.consts[node.output[0]] = numpy_helper.to_array(self._attrs(node)["value"])

    def _identity(self, node: onnx.NodeProto) -> None:
        value = self._input(node)
        self.values[node.output[0]] = self._through(node, value, value.factor)

    def _through(self, node: onnx.NodeProto, value: _Value, factor: float) -> _Value:
        """The value passed on by a node that adds no NIR node of its own."""
        return _Value(value.sources, factor, value.private and self.uses.get(node.output[0], 0) <= 1)

    _dropout = _identity

    def _ifneuron(self, node: onnx.NodeProto) -> None:
        state = self.states.get(node.input[1])
        if state is None:
            self._refuse(node, f"its membrane input {node.input[1]!r} is not a state of the step model")
        attrs = self._attrs(node)
        if if_neuron.RESET_MODES[attrs.get("reset_mode", 0)] != "subtract":
            self._refuse(node, "a hard reset: NIR 1.0.4's IF resets by subtracting the threshold (1.0.6 and later "
                         "reset to v_reset, but the importers checked here do not read it); convert with the "
                         "default reset by subtraction")
        shape = self._shape(node.input[0])[1:]
        value = self._input(node)
        if value.factor <= 0:  # a sign flip cannot go into a threshold: apply it first
            value = self._plain(node.input[0], node.name)
        # IF(c * u) with threshold t fires as IF(u) with threshold t / c (c > 0): its potential is
        # v / c throughout. So a pending factor needs no Scale node here.
        factor = value.factor
        threshold = float(attrs.get("threshold", 1.0)) / factor
        metadata = {"onnx_snn.reset": "subtract", "onnx_snn.fires_at": "v >= v_threshold",
                    "onnx_snn.layer": state.layer}
        v_init = np.broadcast_to(np.asarray(state.init, np.float32), shape).astype(np.float32)
        if np.any(v_init != 0):
            if self.initial_potentials == "refuse":
                self._refuse(node, f"layer {state.layer or state.input!r} starts from non-zero membrane potentials "
                             f"(mean {float(v_init.mean()):.3g}) and NIR 1.0 has no field for an initial state "
                             "(it would need one on IF). Export with initial_potentials='metadata' "
                             "(--initial-potentials metadata) to keep them in each IF node's metadata and set them "
                             "in the importer (docs/nir.md shows how), or convert with --v-init 0 and without "
                             "potential correction")
            metadata["onnx_snn.v_init"] = v_init / np.float32(factor)
        ones = np.ones(shape, np.float32)
        if_node = self.nir.IF(r=ones, v_threshold=threshold * ones, metadata=metadata)
        self._emit(node, "if", if_node, [_Value(value.sources)])

    def _conv(self, node: onnx.NodeProto) -> None:
        attrs = self._attrs(node)
        weight = self._const(node, 1, "weight")
        if weight.ndim != 4:
            self._refuse(node, f"a {weight.ndim - 2}-D convolution; only 2-D ones are exported")
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if pads[:2] != pads[2:]:
            self._refuse(node, f"asymmetric pads {pads}; NIR's Conv2d pads both sides alike")
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            self._refuse(node, "auto_pad; export the ANN with explicit pads")
        value = self._input(node)
        bias = self._const(node, 2, "bias") if len(node.input) > 2 and node.input[2] else np.zeros(weight.shape[0])
        conv = self.nir.Conv2d(input_shape=tuple(self._shape(node.input[0])[2:]),
                               weight=(weight * value.factor).astype(np.float32),
                               stride=tuple(attrs.get("strides", [1, 1])), padding=tuple(pads[:2]),
                               dilation=tuple(attrs.get("dilations", [1, 1])), groups=int(attrs.get("group", 1)),
                               bias=np.asarray(bias, np.float32))
        self._emit(node, "conv2d", conv, [_Value(value.sources)])

    def _affine(self, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None) -> None:
        """x @ weight.T + bias, weight [out, in]."""
        value = self._input(node)
        bias = np.zeros(weight.shape[0]) if bias is None else np.broadcast_to(bias, weight.shape[:1])
        layer = self.nir.Affine(weight=(weight * value.factor).astype(np.float32), bias=np.asarray(bias, np.float32))
        self._emit(node, "affine", layer, [_Value(value.sources)])

    def _gemm(self, node: onnx.NodeProto) -> None:
        attrs = self._attrs(node)
        weight = self._const(node, 1, "weight")
        if attrs.get("transA", 0):
            self._refuse(node, "transA=1; only x @ W (+ b) is exported")
        weight = (weight if attrs.get("transB", 0) else weight.T) * attrs.get("alpha", 1.0)
        bias = (self._const(node, 2, "bias").reshape(-1) * attrs.get("beta", 1.0)
                if len(node.input) > 2 and node.input[2] else None)
        self._affine(node, weight, bias)

    def _matmul(self, node: onnx.NodeProto) -> None:
        weight = self._const(node, 1, "weight")
        if weight.ndim != 2:
            self._refuse(node, "only x @ W with a 2-D W is exported")
        self._affine(node, weight.T, None)

    def _add(self, node: onnx.NodeProto) -> None:
        a, b = node.input
        if a not in self.consts and b not in self.consts:  # a residual: both reach the consumer, which sums them
            va, vb = self._input(node, 0), self._input(node, 1)
            if va.factor != vb.factor:  # bring one side to the other's factor, else both to 1
                if self._rescalable(vb):
                    vb = self._rescaled(vb, va.factor)
                elif self._rescalable(va):
                    va = self._rescaled(va, vb.factor)
                else:
                    va, vb = self._plain(a, node.name), self._plain(b, node.name)
            self.values[node.output[0]] = _Value(va.sources + vb.sources, va.factor)
            return
        tensor, shift = (a, self.consts[b]) if b in self.consts else (b, self.consts[a])
        value = self.values.get(tensor)
        layer = self.nodes[value.sources[0]] if value and len(value.sources) == 1 else None
        if not hasattr(layer, "bias") or value.factor != 1.0 or self.uses.get(tensor, 0) != 1:
            self._refuse(node, "a constant is added; only a bias right after a Conv, Gemm or MatMul is exported")
        shift = np.asarray(shift, np.float32).reshape(-1)
        if shift.size not in (1, layer.bias.size):
            self._refuse(node, f"its constant has {shift.size} values, not one per channel ({layer.bias.size})")
        layer.bias = (layer.bias + shift).astype(np.float32)
        self.values[node.output[0]] = value

    def _mul(self, node: onnx.NodeProto) -> None:
        a, b = node.input
        if a not in self.consts and b not in self.consts:
            self._refuse(node, "a product of two tensors; only scaling by a constant is exported")
        tensor, constant = (a, self.consts[b]) if b in self.consts else (b, self.consts[a])
        value = self._input(node, list(node.input).index(tensor))
        if np.size(constant) == 1:  # folded into the next (or previous) linear layer
            self.values[node.output[0]] = self._through(node, value, value.factor * float(np.asarray(constant).reshape(())))
            return
        shape = self._shape(node.output[0])[1:]
        constant = np.asarray(constant, np.float32)
        if constant.ndim == len(shape) + 1:
            constant = constant[0]
        scale = self.nir.Scale(scale=np.broadcast_to(constant, shape).astype(np.float32))
        log.warning("node %s scales by a tensor: exported as Scale, %s", node.name, _NO_SCALE)
        self._emit(node, "scale", scale, [self._plain(tensor, node.name)])

    def _pool(self, node: onnx.NodeProto, kernel: list[int], stride: list[int], pads: list[int]) -> None:
        value = self._input(node)
        arrays = dict(kernel_size=np.array(kernel), stride=np.array(stride), padding=np.array(pads))
        if self.pooling == "avg":
            self._emit(node, "avgpool2d", self.nir.AvgPool2d(**arrays), [_Value(value.sources)], value.factor)
        else:  # a sum: the divisor joins the pending factor
            self._emit(node, "sumpool2d", self.nir.SumPool2d(**arrays), [_Value(value.sources)],
                       value.factor / float(np.prod(kernel)))

    def _averagepool(self, node: onnx.NodeProto) -> None:
        attrs = self._attrs(node)
        kernel = list(attrs["kernel_shape"])
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if len(kernel) != 2:
            self._refuse(node, "only 2-D pooling is exported")
        if pads[:2] != pads[2:]:
            self._refuse(node, f"asymmetric pads {pads}; NIR's pooling pads both sides alike")
        if attrs.get("ceil_mode", 0):
            self._refuse(node, "ceil_mode=1; NIR's pooling rounds the output size down")
        if any(pads) and not attrs.get("count_include_pad", 0):
            self._refuse(node, "its padding is left out of the average (count_include_pad=0), which NIR cannot say")
        self._pool(node, kernel, list(attrs.get("strides", [1, 1])), pads[:2])

    def _globalaveragepool(self, node: onnx.NodeProto) -> None:
        size = self._shape(node.input[0])[2:]
        if len(size) != 2:
            self._refuse(node, "only 2-D pooling is exported")
        self._pool(node, size, size, [0, 0])

    def _flatten(self, node: onnx.NodeProto) -> None:
        if self._attrs(node).get("axis", 1) != 1:
            self._refuse(node, "only Flatten(axis=1), over every axis but the batch, is exported")
        self._flatten_node(node)

    def _reshape(self, node: onnx.NodeProto) -> None:
        if len(self._shape(node.output[0])) != 2:
            self._refuse(node, "only a Reshape to [batch, features] is exported (as a Flatten)")
        self._flatten_node(node)

    def _flatten_node(self, node: onnx.NodeProto) -> None:
        value = self._input(node)
        shape = self._shape(node.input[0])[1:]
        # NIR's dims index the sample's shape, without the batch axis: 0 is the first feature axis.
        flatten = self.nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0, end_dim=-1)
        self._emit(node, "flatten", flatten, [_Value(value.sources)], value.factor)
