"""The stateful integrate-and-fire neuron: the one place where ``onnx_snn.IFNeuron`` is defined.

One timestep of an IF neuron with reset by subtraction (or hard reset to ``v_reset``)::

    v' = v + x                          # integrate the input current
    s  = 1 if v' >= threshold else 0    # fire (float 0/1)
    v_next = v' - s * threshold         # reset_mode = 0, "subtract" (default)
    v_next = (1 - s) * v' + s * v_reset # reset_mode = 1, "zero" (hard reset)

This is SpikingJelly's ``IFNode`` (``heaviside(v - v_threshold)``, soft reset for
``v_reset=None``), so spike trains match it step for step.

The module holds, and nothing else in the project repeats:

* ``SCHEMA`` -- the ONNX schema (registered on import so ``check_model(full_check=True)``
  knows the op),
* ``if_step`` -- the numpy reference semantics, and ``IFNeuron``, the same as an
  ``onnx.reference`` ``OpRun``,
* ``make_function`` -- the op's body as a model-local ONNX function of standard ops, which
  stock onnxruntime inlines; a native kernel registered for the same domain/op wins over it.

The reset mode is an integer attribute (0 = "subtract", 1 = "zero"; the Python API takes the
names). A string attribute would need a string op in the body, which no GPU provider runs:
onnxruntime then keeps nodes on the CPU and refuses CUDA graphs.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.defs import OpSchema
from onnx.reference.op_run import OpRun

DOMAIN = "onnx_snn"
OP_TYPE = "IFNeuron"
VERSION = 1
MIN_ONNX_OPSET = 15  # CastLike
RESET_MODES = ("subtract", "zero")  # attribute value = index

_DOC = __doc__.split("\n\n")[1]

SCHEMA = OpSchema(
    OP_TYPE, DOMAIN, VERSION,
    doc=_DOC,
    inputs=[OpSchema.FormalParameter("X", "T", "input current of this timestep"),
            OpSchema.FormalParameter("V", "T", "membrane potential before this timestep")],
    outputs=[OpSchema.FormalParameter("S", "T", "spikes of this timestep (0 or 1)"),
             OpSchema.FormalParameter("V_next", "T", "membrane potential after firing and reset")],
    type_constraints=[("T", ["tensor(float)", "tensor(double)", "tensor(float16)"], "floating point")],
    attributes=[
        OpSchema.Attribute("threshold", helper.make_attribute("threshold", 1.0), "firing threshold"),
        OpSchema.Attribute("reset_mode", helper.make_attribute("reset_mode", 0),
                           "0: reset by subtraction; 1: hard reset to v_reset"),
        OpSchema.Attribute("v_reset", helper.make_attribute("v_reset", 0.0), "potential after a hard reset"),
    ],
)
if not onnx.defs.has(OP_TYPE, DOMAIN):
    onnx.defs.register_schema(SCHEMA)


def reset_code(reset_mode) -> int:
    """The attribute value for a reset mode given by name ("subtract", "zero") or code (0, 1)."""
    if isinstance(reset_mode, bytes):
        reset_mode = reset_mode.decode()
    if isinstance(reset_mode, str) and reset_mode in RESET_MODES:
        return RESET_MODES.index(reset_mode)
    if isinstance(reset_mode, (int, np.integer)) and not isinstance(reset_mode, bool) and 0 <= reset_mode < len(RESET_MODES):
        return int(reset_mode)
    raise ValueError(f"IFNeuron reset_mode must be one of {RESET_MODES} (or their codes 0, 1), got {reset_mode!r}")


def check_attributes(threshold: float, reset_mode) -> None:
    """Raise ValueError for attribute values the op does not define."""
    reset_code(reset_mode)
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"IFNeuron threshold must be a finite positive number, got {threshold!r}")


def if_step(x: np.ndarray, v: np.ndarray, threshold: float = 1.0, reset_mode=0,
            v_reset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference semantics of one timestep: (spikes, next potential), in the inputs' dtype.
    Like the ONNX op, ``threshold`` and ``v_reset`` are float32 values (ONNX float attributes)."""
    check_attributes(threshold, reset_mode)
    dtype = np.result_type(x, v)
    v1 = v + x
    th = dtype.type(np.float32(threshold))
    s = (v1 >= th).astype(dtype)
    if reset_code(reset_mode) == 0:
        v_next = v1 - s * th
    else:
        v_next = (dtype.type(1) - s) * v1 + s * dtype.type(np.float32(v_reset))
    return s, v_next.astype(dtype)


class IFNeuron(OpRun):
    """``onnx.reference`` custom op running ``if_step``."""

    op_domain = DOMAIN

    def _run(self, x, v, threshold=1.0, reset_mode=0, v_reset=0.0):
        return if_step(x, v, threshold, reset_mode, v_reset)


def make_node(x: str, v: str, s: str, v_next: str, name: str, *, threshold: float = 1.0,
              reset_mode="subtract", v_reset: float = 0.0) -> onnx.NodeProto:
    check_attributes(threshold, reset_mode)
    return helper.make_node(OP_TYPE, [x, v], [s, v_next], name=name, domain=DOMAIN, **attributes(
        threshold, reset_mode, v_reset))


def attributes(threshold: float = 1.0, reset_mode="subtract", v_reset: float = 0.0) -> dict:
    """Node attributes for these settings (defaults left out)."""
    attrs = {"threshold": float(threshold)}
    if reset_code(reset_mode) != 0:
        attrs.update(reset_mode=reset_code(reset_mode), v_reset=float(v_reset))
    return attrs


def make_function(onnx_opset: int, reset_modes=RESET_MODES) -> onnx.FunctionProto:
    """The op's body from standard ops, for a model whose default-domain opset is ``onnx_opset``.

    ``reset_modes`` names the modes the model's nodes use (names or codes). A body for one mode
    leaves the other's arithmetic out: per step, reset by subtraction costs Add, GreaterOrEqual,
    CastLike, Mul and Sub, the hard reset the first three and a Where, and the body for both
    modes computes both resets and picks one (Where). onnxruntime cannot drop the unused reset by
    itself (the condition is a constant, but both branches are live tensors), and on the CPU the
    general body took twice the time of the subtract-only one (the sample CNN's step, batch 64).

    Attribute-only work (reading the attributes, the reset-mode check) is on scalars that
    onnxruntime folds at load. A node whose reset_mode the body does not implement (any value
    but 0 and 1, or the other mode in a one-mode body) gets NaN potentials instead of silently
    running another reset: the threshold and ``v_reset`` become sqrt of a negative number, so
    every potential is NaN and the neuron stops firing; in the hard-reset-only body, each neuron
    from its first spike on. The converter writes one body for all of a model's neurons, so
    this only shows when a model is edited by hand.
    """
    if onnx_opset < MIN_ONNX_OPSET:
        raise ValueError(f"IFNeuron's body needs opset >= {MIN_ONNX_OPSET}, got {onnx_opset}")
    codes = body_codes(reset_modes)
    nodes = attribute_nodes(codes) + step_nodes(codes, "X", "V", "S", "V_next")
    fn = helper.make_function(DOMAIN, OP_TYPE, ["X", "V"], ["S", "V_next"], nodes,
                              opset_imports=[helper.make_opsetid("", onnx_opset)], attributes=[])
    fn.attribute_proto.extend(function_attributes())
    fn.doc_string = _DOC
    return fn


def body_codes(reset_modes) -> list[int]:
    """The sorted reset-mode codes a function body implements."""
    codes = sorted({reset_code(m) for m in reset_modes})
    if not codes:
        raise ValueError("make_function needs at least one reset mode")
    return codes


def _attr_const(out: str, attr: str, kind: str) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(onnx.AttributeProto(
        name=kind, ref_attr_name=attr,
        type=onnx.AttributeProto.INT if kind == "value_int" else onnx.AttributeProto.FLOAT))
    return node


def attribute_nodes(codes: list[int], like: str = "X") -> list[onnx.NodeProto]:
    """Function-body nodes that turn the attributes into the tensors ``th`` and ``vr`` (in the
    type of ``like``), poisoned to NaN for a reset mode outside ``codes`` (see make_function)."""
    n = helper.make_node
    # poison = sqrt(-(prod over implemented codes c of (mode - c))^2): 0 for an implemented mode, else NaN
    nodes = [_attr_const("th_f", "threshold", "value_float"),
             _attr_const("vr_f", "v_reset", "value_float"),
             _attr_const("mode_i", "reset_mode", "value_int"),
             n("Cast", ["mode_i"], ["mode_f"], to=TensorProto.FLOAT),
             n("Constant", [], ["one_f"], value_float=1.0),
             n("Constant", [], ["zero_f"], value_float=0.0)]
    factors = []
    for c in codes:
        nodes.append(n("Constant", [], [f"code{c}"], value_float=float(c)))
        nodes.append(n("Sub", ["mode_f", f"code{c}"], [f"off{c}"]))
        factors.append(f"off{c}")
    invalid = factors[0]
    for f in factors[1:]:
        nodes.append(n("Mul", [invalid, f], [f"{invalid}_{f}"]))
        invalid = f"{invalid}_{f}"
    nodes += [n("Mul", [invalid, invalid], ["invalid_sq"]),
              n("Neg", ["invalid_sq"], ["neg_invalid_sq"]),
              n("Sqrt", ["neg_invalid_sq"], ["poison"]),
              # the hard-reset body poisons only v_reset: a neuron turns NaN when it would reset
              n("Add", ["th_f", "poison" if codes != [1] else "zero_f"], ["th_checked_f"]),
              n("Add", ["vr_f", "poison"], ["vr_checked_f"]),
              n("CastLike", ["th_checked_f", like], ["th"]),
              n("CastLike", ["vr_checked_f", like], ["vr"])]
    if len(codes) > 1:
        nodes += [n("CastLike", ["one_f", like], ["one"]),
                  n("Cast", ["mode_i"], ["hard"], to=TensorProto.BOOL)]
    return nodes


def step_nodes(codes: list[int], x: str, v: str, s: str, v_next: str) -> list[onnx.NodeProto]:
    """One timestep in standard ops, reading ``th``, ``vr`` (and ``one``, ``hard`` for a
    two-mode body) made by ``attribute_nodes``: the same arithmetic as ``if_step``."""
    n = helper.make_node
    nodes = [n("Add", [v, x], ["V1"]),
             n("GreaterOrEqual", ["V1", "th"], ["fire"]),
             n("CastLike", ["fire", x], [s])]
    if codes == [0]:
        return nodes + [n("Mul", [s, "th"], ["S_th"]), n("Sub", ["V1", "S_th"], [v_next])]
    if codes == [1]:
        return nodes + [n("Where", ["fire", "vr", "V1"], [v_next])]
    return nodes + [
        n("Mul", [s, "th"], ["S_th"]), n("Sub", ["V1", "S_th"], ["V_soft"]),
        n("Sub", ["one", s], ["not_S"]),
        n("Mul", ["not_S", "V1"], ["V_keep"]),
        n("Mul", [s, "vr"], ["S_vr"]),
        n("Add", ["V_keep", "S_vr"], ["V_hard"]),
        n("Where", ["hard", "V_hard", "V_soft"], [v_next])]


def function_attributes() -> list[onnx.AttributeProto]:
    """The attributes (with defaults) every neuron op of the domain takes."""
    return [helper.make_attribute("threshold", 1.0), helper.make_attribute("reset_mode", 0),
            helper.make_attribute("v_reset", 0.0)]


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    """The opsets a model that uses IFNeuron must import besides its default domain."""
    return [helper.make_opsetid(DOMAIN, VERSION)]
