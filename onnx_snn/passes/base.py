"""Pass infrastructure: a pass maps a model to a model and says whether it changed anything.

Modelled on onnx-ir's passes: each pass is one module with one entry point; the manager
runs a visible list of them and names the pass that failed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import onnx

from ..errors import OnnxSnnError, PassError

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool


class Pass:
    """Base class: subclasses implement ``call(model) -> PassResult`` and document their guarantee."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def call(self, model: onnx.ModelProto) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        return self.call(model)


class FunctionPass(Pass):
    """Wraps a plain ``model -> PassResult`` function as a pass."""

    def __init__(self, fn: Callable[[onnx.ModelProto], PassResult], name: str | None = None):
        self._fn = fn
        self._name = name or fn.__name__

    @property
    def name(self) -> str:
        return self._name

    def call(self, model: onnx.ModelProto) -> PassResult:
        return self._fn(model)


class PassManager:
    """Runs passes in order. A project error keeps its type and gains the pass name; any other
    exception becomes a ``PassError`` naming the pass, since it is a bug of ours, not the user's."""

    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        modified = False
        for p in self.passes:
            start = time.perf_counter()
            try:
                result = p(model)
            except OnnxSnnError as e:
                if not getattr(e, "_pass_named", False):
                    e.args = (f"[{p.name}] {e.args[0] if e.args else ''}",) + e.args[1:]
                    e._pass_named = True
                raise
            except Exception as e:  # noqa: BLE001 - re-raised with the pass named
                raise PassError(f"pass {p.name} failed with {type(e).__name__}: {e}. This is a bug in "
                                "onnx-snn; please report it with the model.") from e
            log.debug("pass %s: modified=%s (%.3f s)", p.name, result.modified, time.perf_counter() - start)
            model, modified = result.model, modified or result.modified
        return PassResult(model, modified)
