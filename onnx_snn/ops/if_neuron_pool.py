"""A neuron layer and the AveragePool after it in one node: ``onnx_snn.IFNeuronSeqAvgPool`` and
``onnx_snn.IFNeuronSeqConstAvgPool``.

``IFNeuronSeqAvgPool(X, V) -> (P, V_next, Count)`` is ``IFNeuronSeq`` followed by an
``AveragePool`` whose window is its stride (``kernel_shape``, 2-D, no padding, floor), plus
the spike count of each row: ``P`` is ``[K*N, C, H // kh, W // kw]``, ``Count`` ``[K*N]``
(spikes of all C*H*W neurons of that sample at that step). ``IFNeuronSeqConstAvgPool(X, V,
Steps)`` is the same after ``IFNeuronSeqConst``. Fused, the full-size spikes are never written
to memory and read back: that pass was the chunk model's largest cost after the neuron itself.

The module holds both schemas, the numpy references (the sequence reference, then the pool as
a window sum divided by its size, as onnxruntime's AveragePool computes it) and the function
bodies: the sequence op (a nested call, whose ``Count`` it passes on) and ``AveragePool``.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx.defs import OpSchema
from onnx.reference.op_run import OpRun

from . import if_neuron, if_neuron_seq
from .if_neuron import DOMAIN, VERSION

SEQ_POOL, SEQ_CONST_POOL = "IFNeuronSeqAvgPool", "IFNeuronSeqConstAvgPool"
UNFUSED = {SEQ_POOL: if_neuron_seq.SEQ, SEQ_CONST_POOL: if_neuron_seq.SEQ_CONST}
_DOC = __doc__.split("\n\n")[1]


def _schema(op: str) -> OpSchema:
    base = if_neuron_seq.SCHEMAS[UNFUSED[op]]
    attributes = [OpSchema.Attribute(a.name, a.default_value, a.description) for a in base.attributes.values()]
    attributes.append(OpSchema.Attribute("kernel_shape", OpSchema.AttrType.INTS,
                                         "pooling window and stride [kh, kw]", required=True))
    return OpSchema(
        op, DOMAIN, VERSION, doc=_DOC,
        inputs=[OpSchema.FormalParameter(p.name, p.type_str, p.description) for p in base.inputs],
        outputs=[OpSchema.FormalParameter("P", "T", "pooled spikes [K*N, C, H // kh, W // kw]"),
                 OpSchema.FormalParameter("V_next", "T", "potentials after the last step [N, C, H, W]"),
                 OpSchema.FormalParameter("Count", "T", "spikes per row (sample and step) [K*N]")],
        type_constraints=[(c.type_param_str, list(c.allowed_type_strs), c.description) for c in base.type_constraints],
        attributes=attributes,
    )


SCHEMAS = {op: _schema(op) for op in UNFUSED}
for _schema_ in SCHEMAS.values():
    if not onnx.defs.has(_schema_.name, DOMAIN):
        onnx.defs.register_schema(_schema_)


def average_pool(s: np.ndarray, kernel_shape) -> np.ndarray:
    """AveragePool with window = stride = ``kernel_shape``, no padding: window sum / window size."""
    kh, kw = (int(k) for k in kernel_shape)
    rows, c, h, w = s.shape
    ho, wo = h // kh, w // kw
    windows = s[:, :, :ho * kh, :wo * kw].reshape(rows, c, ho, kh, wo, kw)
    return (windows.sum(axis=(3, 5)) / s.dtype.type(kh * kw)).astype(s.dtype)


def _pooled(s: np.ndarray, v: np.ndarray, kernel_shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if s.ndim != 4 or len(kernel_shape) != 2:
        raise ValueError(f"IFNeuron*AvgPool pools [K*N, C, H, W] with a 2-D window; got spikes {list(s.shape)} "
                         f"and kernel_shape {list(kernel_shape)}")
    return average_pool(s, kernel_shape), v, if_neuron_seq.row_counts(s)


def if_seq_pool(x, v, kernel_shape, threshold=1.0, reset_mode=0, v_reset=0.0):
    """numpy reference of ``IFNeuronSeqAvgPool``."""
    return _pooled(*if_neuron_seq.if_seq(x, v, threshold, reset_mode, v_reset), kernel_shape)


def if_seq_const_pool(x, v, steps, kernel_shape, threshold=1.0, reset_mode=0, v_reset=0.0):
    """numpy reference of ``IFNeuronSeqConstAvgPool``."""
    return _pooled(*if_neuron_seq.if_seq_const(x, v, steps, threshold, reset_mode, v_reset), kernel_shape)


class IFNeuronSeqAvgPool(OpRun):
    op_domain = DOMAIN

    def _run(self, x, v, kernel_shape=None, threshold=1.0, reset_mode=0, v_reset=0.0):
        return if_seq_pool(x, v, kernel_shape, threshold, reset_mode, v_reset)


class IFNeuronSeqConstAvgPool(OpRun):
    op_domain = DOMAIN

    def _run(self, x, v, steps, kernel_shape=None, threshold=1.0, reset_mode=0, v_reset=0.0):
        return if_seq_const_pool(x, v, steps, kernel_shape, threshold, reset_mode, v_reset)


REFERENCE_OPS = [*if_neuron_seq.REFERENCE_OPS, IFNeuronSeqAvgPool, IFNeuronSeqConstAvgPool]


def _ref(name: str, kind) -> onnx.AttributeProto:
    return onnx.AttributeProto(name=name, ref_attr_name=name, type=kind)


def make_function(op: str, onnx_opset: int) -> onnx.FunctionProto:
    """``op``'s body: a call of the sequence op (whose function the model must also carry), then
    AveragePool(kernel_shape = strides) on its spikes."""
    if op not in SCHEMAS:
        raise ValueError(f"unknown pooled neuron op {op!r}; one of {list(SCHEMAS)}")
    if onnx_opset < if_neuron.MIN_ONNX_OPSET:
        raise ValueError(f"{op}'s body needs opset >= {if_neuron.MIN_ONNX_OPSET}, got {onnx_opset}")
    inputs = ["X", "V"] + (["Steps"] if op == SEQ_CONST_POOL else [])
    seq = helper.make_node(UNFUSED[op], inputs, ["S", "V_next", "Count"], domain=DOMAIN)
    seq.attribute.extend([_ref("threshold", onnx.AttributeProto.FLOAT), _ref("reset_mode", onnx.AttributeProto.INT),
                          _ref("v_reset", onnx.AttributeProto.FLOAT)])
    pool = helper.make_node("AveragePool", ["S"], ["P"])
    pool.attribute.extend([_ref("kernel_shape", onnx.AttributeProto.INTS),
                           onnx.AttributeProto(name="strides", ref_attr_name="kernel_shape",
                                               type=onnx.AttributeProto.INTS)])
    nodes = [seq, pool]
    fn = helper.make_function(DOMAIN, op, inputs, ["P", "V_next", "Count"], nodes,
                              opset_imports=[helper.make_opsetid("", onnx_opset), helper.make_opsetid(DOMAIN, VERSION)],
                              attributes=["kernel_shape"])
    fn.attribute_proto.extend(if_neuron.function_attributes())
    fn.doc_string = _DOC
    return fn


def fusable(pool_attrs: dict) -> str | None:
    """Why an AveragePool with these attributes cannot be fused into the neuron before it, or None."""
    kernel = list(pool_attrs.get("kernel_shape", []))
    if len(kernel) != 2:
        return f"a {len(kernel)}-D window (the fused op pools 2-D)"
    if list(pool_attrs.get("strides", [1, 1])) != kernel:
        return "its stride differs from its window"
    auto_pad = pool_attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if any(pool_attrs.get("pads", [0, 0, 0, 0])) or auto_pad not in ("NOTSET", "VALID"):
        return "it pads"
    if pool_attrs.get("ceil_mode", 0) or any(d != 1 for d in pool_attrs.get("dilations", [1, 1])):
        return "ceil_mode or dilations"
    return None
