"""Final pass: complete the step model's metadata and check it.

The only pass that writes ``metadata_props``: the conversion record (``onnx_snn.record``) the
earlier passes handed on becomes the step-model record.

Guarantees: ``metadata_props`` hold the full step-model record (format version, state pairs,
output decoding, calibration mode and lambda per layer, the source model's SHA-256, converter
options) readable by ``onnx_snn_runtime.format.StepModelSpec``, and no other ``onnx_snn.``
entry; the IR version is the smallest the opsets allow (onnxruntime 1.31 reads <= 13); and
``onnx.checker.check_model(full_check=True)`` passes.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx_snn_runtime.format import KEY_CONVERTER, StepModelSpec, metadata

from ..errors import ModelWeightsError, PassError
from ..graph import ir_version_for
from ..record import ConversionRecord
from .base import ContractError, Pass, PassResult


def step_model_spec(model: onnx.ModelProto, record: ConversionRecord, source_sha256: str = "") -> StepModelSpec:
    """The step-model record of ``model`` from the conversion record."""
    state_outputs = {s.output for s in record.states}
    outputs = {o.name: "sum" for o in model.graph.output if o.name not in state_outputs}
    options = record.options.recorded()
    if record.dropped_softmax:
        options["dropped_softmax"] = list(record.dropped_softmax)
    return StepModelSpec(list(record.states), outputs, calibration=record.calibration_json(),
                         source_sha256=source_sha256, converter=options)


class WriteStepModel(Pass):
    def __init__(self, source_sha256: str = ""):
        self.source_sha256 = source_sha256

    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        spec = step_model_spec(model, record, self.source_sha256)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        keep = [p for p in out.metadata_props if not p.key.startswith("onnx_snn.")]
        del out.metadata_props[:]
        out.metadata_props.extend(keep)
        for key, value in spec.to_metadata().items():
            out.metadata_props.add(key=key, value=value)
        for t in out.graph.initializer:  # huge activations (about 1e30) can overflow the scaled constants
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
                if not np.isfinite(onnx.numpy_helper.to_array(t)).all():
                    raise ModelWeightsError(f"constant {t.name!r} of the step model overflows its type; the source "
                                            "model's activations are too large for float32 arithmetic "
                                            f"(calibrated scales: {[site.lam for site in record.sites][:4]}); "
                                            "rescale its weights or inputs")
        out.ir_version = ir_version_for(out)
        out.producer_name, out.producer_version = "onnx-snn", _version()
        try:
            onnx.checker.check_model(out, full_check=True)
        except onnx.checker.ValidationError as e:
            raise PassError(f"the step model fails onnx.checker: {e}") from e
        return PassResult(out, True, record)

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        spec = StepModelSpec.from_metadata(metadata(model.metadata_props))
        if [s.input for s in spec.states] != [s.input for s in record.states]:
            raise ContractError("the states written differ from the record's")
        if model.ir_version != ir_version_for(model):
            raise ContractError(f"IR version {model.ir_version}, not the smallest the opsets allow")


def with_selection(model: onnx.ModelProto, selection: dict) -> onnx.ModelProto:
    """``model`` with the preset's recipe selection (``onnx_snn.selection``) recorded in its
    converter options, under ``selection``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    prop = next(p for p in out.metadata_props if p.key == KEY_CONVERTER)
    prop.value = json.dumps({**json.loads(prop.value), "selection": selection})
    return out


def _version() -> str:
    from .. import __version__
    return __version__
