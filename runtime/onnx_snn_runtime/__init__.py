"""onnx-snn runtime: simulate SNN step models with onnxruntime (numpy and onnxruntime only)."""
from .errors import DataError, OnnxSnnError
from .format import FormatError, StepModelSpec
from .providers import ProviderError
from .simulator import Evaluation, Simulator

__all__ = ["Simulator", "Evaluation", "StepModelSpec", "OnnxSnnError", "DataError", "FormatError", "ProviderError"]
