"""Shared test helpers (plain functions; fixtures live in conftest.py)."""
import numpy as np
import onnx
import onnxruntime as ort


def run_ort(model: onnx.ModelProto, feeds: dict, outputs=None) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b|: the figure exactness tests assert on."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
