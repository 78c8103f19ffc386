"""onnx-snn: convert trained ReLU networks into spiking neural networks that run wherever ONNX runs.

    import onnx_snn
    snn = onnx_snn.Converter(calib_data, mode="99.9%")(model)
    onnx_snn.save(snn, "cnn.snn.onnx")
"""
__version__ = "0.1.0"

from onnx_snn_runtime.format import StepModelSpec

from .converter import Converter
from .errors import CalibrationError, DataError, ModelLoadError, OnnxSnnError, OptionError, PassError, UnsupportedOpError
from .io import save
from .nir_export import NirExportError, export_nir, write_nir
from .ops import if_neuron


def load(path) -> "onnx.ModelProto":  # noqa: F821 - documented type
    """Load an ONNX model (source ANN or step model) with the project's errors."""
    from .io import load as _load
    return _load(path)[0]


def spec(model) -> StepModelSpec:
    """The step-model record (states, outputs, calibration) of a converted model."""
    return StepModelSpec.from_model(model)


__all__ = ["Converter", "save", "load", "spec", "StepModelSpec", "if_neuron", "OnnxSnnError", "ModelLoadError",
           "UnsupportedOpError", "OptionError", "CalibrationError", "DataError", "PassError",
           "export_nir", "write_nir", "NirExportError", "__version__"]
