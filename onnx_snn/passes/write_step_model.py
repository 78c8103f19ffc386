"""Final pass: complete the step model's metadata and check it.

Guarantees: ``metadata_props`` hold the full step-model record (format version, state pairs,
output decoding, calibration mode and lambda per layer, the source model's SHA-256, converter
options) readable by ``onnx_snn_runtime.format.StepModelSpec``; temporary records of earlier
passes are folded in; the IR version is the smallest the opsets allow (onnxruntime 1.31 reads
<= 13); and ``onnx.checker.check_model(full_check=True)`` passes.
"""
from __future__ import annotations

import json

import numpy as np
import onnx

from onnx_snn_runtime.format import KEY_CALIBRATION, KEY_STATES, State, StepModelSpec

from ..errors import ModelWeightsError, PassError
from ..graph import ir_version_for
from .base import Pass, PassResult
from .output_softmax import METADATA_KEY as SOFTMAX_KEY


class WriteStepModel(Pass):
    def __init__(self, source_sha256: str = "", options: dict | None = None):
        self.source_sha256, self.options = source_sha256, dict(options or {})

    def call(self, model: onnx.ModelProto) -> PassResult:
        meta = {p.key: p.value for p in model.metadata_props}
        states = [State.from_json(d) for d in json.loads(meta.get(KEY_STATES, "[]"))]
        state_outputs = {s.output for s in states}
        outputs = {o.name: "sum" for o in model.graph.output if o.name not in state_outputs}
        options = dict(self.options)
        if SOFTMAX_KEY in meta:
            options["dropped_softmax"] = json.loads(meta[SOFTMAX_KEY])
        spec = StepModelSpec(states, outputs, calibration=json.loads(meta.get(KEY_CALIBRATION, "{}")),
                             source_sha256=self.source_sha256, converter=options)
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
                                            f"(calibrated scales: {[e['lambda'] for e in spec.calibration.get('layers', [])][:4]}); "
                                            "rescale its weights or inputs")
        out.ir_version = ir_version_for(out)
        out.producer_name, out.producer_version = "onnx-snn", _version()
        try:
            onnx.checker.check_model(out, full_check=True)
        except onnx.checker.ValidationError as e:
            raise PassError(f"the step model fails onnx.checker: {e}") from e
        return PassResult(out, True)


def _version() -> str:
    from .. import __version__
    return __version__
