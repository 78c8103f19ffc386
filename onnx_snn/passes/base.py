"""Pass infrastructure, modelled on onnx-ir's passes.

A pass maps (model, conversion record) to a ``PassResult``: the new model, the updated record
(``onnx_snn.record``) and whether anything changed. Each pass is one module with one entry
point and a docstring stating its guarantee; ``ensures`` checks that guarantee on the result
(``requires`` its precondition on the input). The manager runs a visible list of passes, names
the pass that failed, and runs the postconditions when checking is on: in the test suite, with
``onnx-snn -v --check-passes`` or the environment variable ``ONNX_SNN_CHECK_PASSES=1``.

A rewrite that declines to change something says why with a ``Check`` (the way onnxscript's
rewriter returns a ``MatchResult``): falsy, with a reason the pass logs at debug level.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from typing import Sequence

import onnx

from ..errors import OnnxSnnError, PassError
from ..record import ConversionRecord

log = logging.getLogger(__name__)
CHECK_ENV = "ONNX_SNN_CHECK_PASSES"


class Check:
    """The outcome of a rewrite's check: truthy when the rewrite applies, else falsy with the reason."""
    __slots__ = ("reason",)

    def __init__(self, reason: str = ""):
        self.reason = reason

    def __bool__(self) -> bool:
        return not self.reason

    def __repr__(self) -> str:
        return "Check(ok)" if self else f"Check(fail: {self.reason})"


OK = Check()


def fail(reason: str) -> Check:
    return Check(reason)


class ContractError(PassError):
    """A pass broke its documented guarantee (found by ``ensures``): a bug in onnx-snn."""


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    record: ConversionRecord


class Pass:
    """Base class: subclasses implement ``call(model, record) -> PassResult`` and document
    their guarantee; ``requires`` and ``ensures`` raise ``ContractError`` (or a project error
    for a user's mistake) when the pre- or postcondition does not hold."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        """Precondition on the input; always checked."""

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        """Postcondition on the output; checked by the manager when checking is on."""

    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto, record: ConversionRecord | None = None) -> PassResult:
        """Run on ``model``; ``record`` is copied, never changed (a fresh one when not given)."""
        record = copy.deepcopy(record) if record is not None else ConversionRecord()
        self.requires(model, record)
        return self.call(model, record)

    def check_rewrite(self, check: Check, what: str) -> bool:
        """Log a declined rewrite's reason (debug) and return whether the rewrite applies."""
        if not check:
            log.debug("%s: %s: %s", self.name, what, check.reason)
        return bool(check)


def checking_enabled() -> bool:
    return os.environ.get(CHECK_ENV, "").lower() not in ("", "0", "false", "no")


class PassManager:
    """Runs passes in order. A project error keeps its type and gains the pass name; any other
    exception becomes a ``PassError`` naming the pass, since it is a bug of ours, not the user's.
    With ``check`` (default: the ``ONNX_SNN_CHECK_PASSES`` environment variable) each pass's
    ``ensures`` runs on its result."""

    def __init__(self, passes: Sequence[Pass], check: bool | None = None):
        self.passes = list(passes)
        self.check = checking_enabled() if check is None else check

    def __call__(self, model: onnx.ModelProto, record: ConversionRecord | None = None) -> PassResult:
        modified = False
        record = record if record is not None else ConversionRecord()
        for p in self.passes:
            start = time.perf_counter()
            try:
                result = p(model, record)
                if self.check:
                    p.ensures(result.model, result.record)
            except OnnxSnnError as e:
                if not getattr(e, "_pass_named", False):
                    e.args = (f"[{p.name}] {e.args[0] if e.args else ''}",) + e.args[1:]
                    e._pass_named = True
                raise
            except Exception as e:  # noqa: BLE001 - re-raised with the pass named
                raise PassError(f"pass {p.name} failed with {type(e).__name__}: {e}. This is a bug in "
                                "onnx-snn; please report it with the model.") from e
            log.debug("pass %s: modified=%s (%.3f s)", p.name, result.modified, time.perf_counter() - start)
            model, record, modified = result.model, result.record, modified or result.modified
        return PassResult(model, modified, record)


def check_sorted(model: onnx.ModelProto) -> None:
    """Raise ``ContractError`` unless every node's inputs are produced before it (or are graph
    inputs, initializers or empty)."""
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    for node in model.graph.node:
        missing = [i for i in node.input if i not in known]
        if missing:
            raise ContractError(f"node {node.name!r} reads {missing} before they are produced")
        known.update(node.output)
