"""ModelProto helpers shared by passes: metadata replacement and onnxruntime probe sessions."""
from __future__ import annotations

import onnx
import onnxruntime as ort


def with_metadata(model: onnx.ModelProto, key: str, value: str) -> onnx.ModelProto:
    """A copy of ``model`` whose metadata entry ``key`` is ``value`` (replaced if present)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for p in [p for p in out.metadata_props if p.key == key]:
        out.metadata_props.remove(p)
    out.metadata_props.add(key=key, value=value)
    return out


def probe_model(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the tensors ``outputs`` exposed as extra graph outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs if n not in known)
    return probe


def cpu_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session of a model the converter built. Canonicalize has checked that onnxruntime
    runs the source, so a failure here is onnx-snn's (the pass manager reports it as such)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def probe_session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    """A CPU session of ``model`` with the tensors ``outputs`` exposed as extra graph outputs."""
    return cpu_session(probe_model(model, outputs))
