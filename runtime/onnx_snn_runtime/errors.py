"""The project's error type, shared by the runtime and the converter."""


class OnnxSnnError(Exception):
    """Base class of every error onnx-snn raises on purpose: the message says what and what to do."""


class DataError(OnnxSnnError, ValueError):
    """Input data (calibration set, dataset file, array) that cannot be used as given."""
