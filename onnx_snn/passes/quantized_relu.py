"""Trained-activation pass: find QCFS activations and make them neuron sites with the graph's λ.

A network fine-tuned with the quantization-clip-floor-shift activation (QCFS; Bu et al., ICLR
2022; ``onnx_snn.qcfs``) computes, per ReLU it replaced, ``λ·clip(floor(x·L/λ + 1/2)/L, 0, 1)``.
Exporters spell it in many ways (Div then Mul or one Mul by L/λ, Clip or Max/Min or Relu+Min,
Add 0.5 or Sub -0.5, clamp before or after the Floor). ``QuantizedReLU`` looks at every
``Floor`` and at the chain around it:

* before it, ops with one scalar constant operand that are affine (Mul, Div by a constant, Add,
  Sub, Neg) or clamps (Clip with constant bounds, Relu, Max/Min with a constant), back to a
  tensor x;
* after it, the same kinds of ops, forwards;

every tensor inside the chain read by the next op only. Affine maps and clamps compose, and a
Floor after ``a·clip(x, l, h) + b`` with a > 0 is ``clip(floor(a·x + b), ⌊a·l + b⌋, ⌊a·h + b⌋)``,
so each chain is ``y = s·clip(floor(a·x + b), lo, hi) + c``. It is QCFS when a > 0, s·a = 1
(relative tolerance ``RTOL``), lo = 0, c = 0, hi = L a positive integer and 0 <= b < 1; then
``λ = s·L`` (= L/a) and the chain equals ``λ/L · clip(floor(x·L/λ + b), 0, L)``: what an IF
neuron with threshold λ, reset by subtraction and initial potential b (in thresholds) outputs
on average over L steps of the constant input x. Of the sub-chains around one Floor the longest
that is QCFS, the one reaching furthest back and then ending soonest after the Floor is
taken (a Floor's ops after the activation may scale the next activation's input, and composed
with it look like QCFS too); ``check`` returns the reason when none is.

The chain becomes ``Clip(x, 0, λ)`` (named after the Floor), which every later pass treats as
a neuron site, and a ``TrainedSite`` (node, λ, L, v_init = b, the nodes replaced) in
``ConversionRecord.trained``. ``QuantizedReLUScales``, after ``Calibrate``, then gives each
such ``NeuronSite`` the graph's λ instead of the calibrated one, its levels (written to the
step model as ``trained_levels``) and its own initial potential b whatever the ``v_init``
option (``InsertNeurons`` reads it). A model without QCFS is left exactly as it was.

Guarantees (``QuantizedReLU``): each recognised chain equals ``λ/L·clip(floor(x·L/λ + b), 0, L)``
for its ``TrainedSite``'s λ, L and b = v_init (λ > 0, L >= 1, 0 <= b < 1) to float rounding, and
is replaced by ``Clip(x, 0, λ)``: the function its neuron layer rate-codes as T grows, which an
IF layer starting at b computes exactly at T = L; no node of a recognised chain remains; nothing
else changes (a model without a QCFS chain is returned as it was). (``QuantizedReLUScales``): every trained site is a
calibrated ``NeuronSite`` with λ, levels and v_init from its ``TrainedSite``; the graph is
unchanged.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import CalibrationError
from ..graph import const, export_model, import_graph, is_standard, np_dtype, producer, sole_consumer
from ..record import ConversionRecord, TrainedSite
from .base import OK, Check, ContractError, Pass, PassResult, check_sorted, fail

log = logging.getLogger(__name__)

RTOL = 1e-5        # s·a = 1, and hi an integer, to this relative tolerance (float32 constants)
ATOL_LEVELS = 1e-4  # lo = 0 and c = 0 to this many levels
MAX_CHAIN = 16      # ops followed on each side of a Floor

_AFFINE = ("Mul", "Div", "Add", "Sub", "Neg")
_CLAMP = ("Clip", "Relu", "Max", "Min")


@dataclass
class Step:
    """One op of a chain: ``y = m·v + k`` (affine) or ``y = clip(v, lo, hi)`` (clamp)."""
    node: gs.Node
    var: gs.Tensor            # the activation input
    kind: str                 # "affine" or "clamp"
    p: float                  # m, or lo
    q: float                  # k, or hi


def _scalar(tensor: gs.Tensor, var: gs.Tensor) -> float | Check:
    """The value of a constant operand that is one number and broadcasts without changing ``var``'s shape."""
    value = const(tensor)
    if value is None:
        return fail(f"its operand {tensor.name!r} is not a constant")
    if value.size != 1:
        return fail(f"its constant {tensor.name!r} holds {value.size} values, not one")
    if value.ndim and (var.shape is None or value.ndim > len(var.shape)):
        return fail(f"its constant {tensor.name!r} of rank {value.ndim} may broadcast the activation")
    number = float(value.reshape(()))
    return number if not math.isnan(number) else fail(f"its constant {tensor.name!r} is NaN")


def parse(node: gs.Node, var: gs.Tensor) -> Step | Check:
    """``node`` as a chain step on the activation ``var``, or why it is not one."""
    if not is_standard(node) or node.op not in _AFFINE + _CLAMP:
        return fail(f"{node.name} ({node.op}) is not a scalar affine op or a clamp")
    inputs = [t for t in node.inputs if not t.is_empty()]
    if len(node.outputs) != 1 or [t.name for t in inputs].count(var.name) != 1:
        return fail(f"{node.name} ({node.op}) reads the activation more than once or has several outputs")
    if node.op in ("Neg", "Relu"):
        return Step(node, var, "affine", -1.0, 0.0) if node.op == "Neg" else Step(node, var, "clamp", 0.0, math.inf)
    if node.op == "Clip":
        if node.inputs[0] is not var:
            return fail(f"{node.name} (Clip) clips a constant")
        bounds = []
        for i, default in ((1, -math.inf), (2, math.inf)):
            if len(node.inputs) <= i or node.inputs[i].is_empty():
                bounds.append(default)
                continue
            value = _scalar(node.inputs[i], var)
            if isinstance(value, Check):
                return fail(f"{node.name} (Clip): {value.reason}")
            bounds.append(value)
        return Step(node, var, "clamp", *bounds)
    if len(inputs) != 2:
        return fail(f"{node.name} ({node.op}) has {len(inputs)} inputs, not 2")
    other = inputs[1] if inputs[0] is var else inputs[0]
    value = _scalar(other, var)
    if isinstance(value, Check):
        return fail(f"{node.name} ({node.op}): {value.reason}")
    first = inputs[0] is var
    if node.op == "Mul":
        return Step(node, var, "affine", value, 0.0)
    if node.op == "Add":
        return Step(node, var, "affine", 1.0, value)
    if node.op == "Sub":
        return Step(node, var, "affine", 1.0, -value) if first else Step(node, var, "affine", -1.0, value)
    if node.op == "Div":
        if not first:
            return fail(f"{node.name} (Div) divides a constant by the activation")
        if value == 0:
            return fail(f"{node.name} (Div) divides by zero")
        return Step(node, var, "affine", 1.0 / value, 0.0)
    if node.op == "Max":
        return Step(node, var, "clamp", value, math.inf)
    return Step(node, var, "clamp", -math.inf, value)  # Min


@dataclass
class Composed:
    """``y = s·clip(u, lo, hi) + c`` of the chain's input u, built step by step."""
    s: float = 1.0
    lo: float = -math.inf
    hi: float = math.inf
    c: float = 0.0

    def apply(self, step: Step) -> Check:
        if step.kind == "affine":
            self.s, self.c = self.s * step.p, self.c * step.p + step.q
            return OK
        if self.s <= 0:  # a clamp after a negative scale flips into a clamp of the other side
            return fail(f"{step.node.name} ({step.node.op}) clamps after a non-positive scale {self.s:g}")
        lo, hi = max(self.lo, (step.p - self.c) / self.s), min(self.hi, (step.q - self.c) / self.s)
        if lo > hi:
            return fail(f"{step.node.name} ({step.node.op}) leaves a constant output")
        self.lo, self.hi = lo, hi
        return OK


@dataclass
class QCFSChain:
    """A recognised chain: the nodes, the input x, the output y and the QCFS numbers."""
    nodes: list[gs.Node]
    x: gs.Tensor
    y: gs.Tensor
    lam: float
    levels: int
    v_init: float


def compose(pre: list[Step], post: list[Step]) -> tuple[float, float, Composed] | Check:
    """(a, b, post-Floor composition) of ``s·clip(floor(a·x + b), lo, hi) + c``, or why not."""
    inner = Composed()
    for step in pre:
        check = inner.apply(step)
        if not check:
            return check
    a, b = inner.s, inner.c
    if not (a > 0 and math.isfinite(a) and math.isfinite(b)):
        return fail(f"the Floor's input scale a = {a:g} is not positive and finite")
    # floor is monotone: floor(a·clip(x, l, h) + b) = clip(floor(a·x + b), floor(a·l + b), floor(a·h + b))
    outer = Composed(1.0, math.floor(a * inner.lo + b) if math.isfinite(inner.lo) else -math.inf,
                     math.floor(a * inner.hi + b) if math.isfinite(inner.hi) else math.inf, 0.0)
    for step in post:
        check = outer.apply(step)
        if not check:
            return check
    return a, b, outer


def check(pre: list[Step], post: list[Step]) -> Check:
    """Whether the chain ``pre`` -> Floor -> ``post`` is a QCFS activation, else the reason."""
    composed = compose(pre, post)
    if isinstance(composed, Check):
        return composed
    a, b, g = composed
    if not math.isfinite(g.hi):
        return fail("no upper clamp: floor(a·x + b) is unbounded")
    if not math.isfinite(g.s) or abs(g.s * a - 1.0) > RTOL:
        return fail(f"s·a = {g.s * a:.7g}, not 1: the output scale s = {g.s:.7g} is not the inverse of "
                    f"the input scale a = {a:.7g}")
    if abs(g.lo) > ATOL_LEVELS:
        return fail(f"the lower clamp is at {g.lo:.7g} levels, not 0")
    if abs(g.c) > ATOL_LEVELS * abs(g.s):
        return fail(f"the output is offset by c = {g.c:.7g}, not 0")
    levels = round(g.hi)
    if levels < 1 or abs(g.hi - levels) > RTOL * max(levels, 1):
        return fail(f"the upper clamp is at {g.hi:.7g} levels, not a positive integer L")
    if not (-RTOL <= b < 1.0):
        return fail(f"the shift before the Floor is b = {b:.7g}, outside [0, 1)")
    return OK


def _walk_back(graph: gs.Graph, floor: gs.Node, keep: set[str]) -> tuple[list[Step], Check]:
    """The steps before ``floor``, in order, and why the walk stopped (OK at an op of another
    kind, or at a ``keep`` node: a trained site found already, which stays a neuron)."""
    steps: list[Step] = []
    t, reader = floor.inputs[0], floor
    while len(steps) < MAX_CHAIN:
        node = producer(t)
        if node is None or sole_consumer(graph, t) is not reader or node.op not in _AFFINE + _CLAMP \
                or node.name in keep:
            return steps, OK
        variables = [i for i in node.inputs if not i.is_empty() and const(i) is None]
        if len(variables) != 1:
            return steps, fail(f"{node.name} ({node.op}) has {len(variables)} non-constant inputs")
        step = parse(node, variables[0])
        if isinstance(step, Check):
            return steps, step
        steps.insert(0, step)
        t, reader = variables[0], node
    return steps, OK


def _walk_forward(graph: gs.Graph, floor: gs.Node) -> tuple[list[Step], Check]:
    steps: list[Step] = []
    t = floor.outputs[0]
    while len(steps) < MAX_CHAIN:
        node = sole_consumer(graph, t)
        if node is None or node.op not in _AFFINE + _CLAMP:
            return steps, OK
        step = parse(node, t)
        if isinstance(step, Check):
            return steps, step
        steps.append(step)
        t = node.outputs[0]
    return steps, OK


def find(graph: gs.Graph, floor: gs.Node, keep: frozenset[str] = frozenset()) -> QCFSChain | Check:
    """The QCFS chain through ``floor`` (see the module docstring; not reaching back into the
    ``keep`` nodes), or why there is none."""
    if len(floor.outputs) != 1 or not floor.inputs:
        return fail(f"{floor.name} is not a one-output Floor")
    if np_dtype(floor.outputs[0]).kind != "f":
        return fail(f"{floor.name} floors a non-float tensor")
    pre, pre_stop = _walk_back(graph, floor, keep)
    post, post_stop = _walk_forward(graph, floor)
    # reaching back as far as possible, then ending as soon as possible after the Floor (the ops
    # after a QCFS may scale the next one's input: Mul(λ1) -> Div(λ2) composes to QCFS too)
    for i, j in ((i, j) for i in range(len(pre) + 1) for j in range(len(post) + 1)):
        if check(pre[i:], post[:j]):
            a, b, g = compose(pre[i:], post[:j])
            levels = round(g.hi)
            x = pre[i].var if i < len(pre) else floor.inputs[0]
            y = post[j - 1].node.outputs[0] if j else floor.outputs[0]
            lam = float(np_dtype(x).type(g.s * levels))  # as the Clip holds it, so that λ <= its max exactly
            return QCFSChain([s.node for s in pre[i:]] + [floor] + [s.node for s in post[:j]], x, y,
                             lam, levels, max(b, 0.0))
    reason = check(pre, post).reason
    stops = [c.reason for c in (pre_stop, post_stop) if not c]
    return fail(reason + "".join(f"; the chain stops because {r}" for r in stops))


class QuantizedReLU(Pass):
    def requires(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        if record.calibration is not None:
            raise ContractError("QuantizedReLU runs before Calibrate (its sites are calibrated like any Clip)")

    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        if not any(n.op_type == "Floor" for n in model.graph.node):
            return PassResult(model, False, record)
        graph = import_graph(model)
        graph.toposort()
        found = []
        for floor in [n for n in graph.nodes if n.op == "Floor" and is_standard(n)]:
            chain = find(graph, floor, frozenset(t.node for t in record.trained))
            if not self.check_rewrite(chain if isinstance(chain, Check) else OK, f"Floor {floor.name}"):
                continue
            self._rewrite(graph, floor.name, chain)
            record.trained.append(TrainedSite(floor.name, chain.lam, chain.levels, chain.v_init,
                                              [n.name for n in chain.nodes]))
            found.append(chain)
        if not found:
            return PassResult(model, False, record)
        log.info("found %d trained QCFS activation(s): %s", len(found),
                 ", ".join(f"{t.node} (L={t.levels}, lambda={t.lam:.4g})" for t in record.trained))
        return PassResult(export_model(graph, model), True, record)

    @staticmethod
    def _rewrite(graph: gs.Graph, name: str, chain: QCFSChain) -> None:
        for node in chain.nodes:
            node.inputs.clear()
            node.outputs.clear()
        dtype = np_dtype(chain.x)
        graph.nodes.append(gs.Node("Clip", name, inputs=[
            chain.x, gs.Constant(f"{name}.qcfs_min", np.array(0, dtype)),
            gs.Constant(f"{name}.qcfs_lambda", np.array(chain.lam, dtype))], outputs=[chain.y]))

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        check_sorted(model)
        nodes = {n.name: n for n in model.graph.node}
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        for site in record.trained:
            node = nodes.get(site.node)
            if node is None or node.op_type != "Clip":
                raise ContractError(f"trained site {site.node} is not a Clip in the graph")
            bounds = [float(inits[i]) if i in inits else math.nan for i in node.input[1:]]
            if len(bounds) != 2 or bounds[0] != 0.0 or not math.isclose(bounds[1], site.lam, rel_tol=1e-6):
                raise ContractError(f"{site.node}: the Clip's bounds are not (0, {site.lam})")
            if not (site.lam > 0 and site.levels >= 1 and 0 <= site.v_init < 1):
                raise ContractError(f"{site.node}: lambda {site.lam}, L {site.levels}, v_init {site.v_init}")
            left = [n for n in site.nodes if n != site.node and n in nodes]
            if left:
                raise ContractError(f"{site.node}: the chain's nodes {left} are still in the graph")


class QuantizedReLUScales(Pass):
    """After ``Calibrate``: each trained site keeps the graph's λ, its levels and its shift b as
    the neuron's initial potential (see the module docstring)."""

    def requires(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        if record.calibration is None:
            raise CalibrationError("the model has no calibration record; run the Calibrate pass first")
        missing = sorted({t.node for t in record.trained} - {s.node for s in record.sites})
        if missing:
            raise ContractError(f"trained sites {missing} were not calibrated")

    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        trained = {t.node: t for t in record.trained}
        for site in record.sites:
            t = trained.get(site.node)
            if t is None:
                continue
            site.lam, site.levels, site.v_init = t.lam, t.levels, t.v_init
            site.share_above = 0.0  # the Clip's output never exceeds λ
        if trained and record.options.reset_mode != "subtract":
            log.warning("reset_mode=%r: trained QCFS layers are exact at T = L only with reset by subtraction",
                        record.options.reset_mode)
        return PassResult(model, False, record)

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        trained = {t.node: t for t in record.trained}
        for site in record.sites:
            t = trained.get(site.node)
            if t is not None and (site.lam, site.levels, site.v_init) != (t.lam, t.levels, t.v_init):
                raise ContractError(f"{site.node}: lambda/levels/v_init are not the graph's")
