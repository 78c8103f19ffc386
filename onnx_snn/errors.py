"""Errors the converter raises on purpose. Each message names the node, op or value and says what to do."""
from onnx_snn_runtime.errors import DataError, OnnxSnnError

from .op_sets import SUPPORTED_OPS

__all__ = ["OnnxSnnError", "DataError", "ModelLoadError", "ModelWeightsError", "UnsupportedOpError",
           "OptionError", "CalibrationError", "PassError"]


class ModelLoadError(OnnxSnnError):
    """The model file or object cannot be read or is not a valid ONNX model."""


class ModelWeightsError(ModelLoadError):
    """A weight, bias or other constant the model computes with holds NaN or Inf."""


class UnsupportedOpError(OnnxSnnError):
    """The graph holds an operator (or an operator use) that has no faithful SNN equivalent here."""

    def __init__(self, node_name: str, op_type: str, why: str):
        self.node_name, self.op_type = node_name, op_type
        super().__init__(f"node {node_name!r} (op {op_type}) {why}. Supported ops: "
                         f"{', '.join(sorted(SUPPORTED_OPS))}. Replace it in the source model or "
                         "file an issue with the model attached.")


class OptionError(OnnxSnnError, ValueError):
    """A converter option has a value it does not accept."""


class CalibrationError(OnnxSnnError):
    """Calibration could not produce scales from the data given."""


class PassError(OnnxSnnError):
    """A graph pass failed; the message names the pass."""
