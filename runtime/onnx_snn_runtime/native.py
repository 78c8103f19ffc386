"""The native kernel library (``runtime/kernels/``, built by ``scripts/build_kernels.sh``).

It registers CPU kernels for the ``onnx_snn`` neuron ops (``IFNeuron``, ``IFNeuronSeq``,
``IFNeuronSeqConst``); onnxruntime prefers a registered kernel over the model's function body,
so a session with the library runs the same model faster and computes the same numbers.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from .errors import OnnxSnnError

ENV = "ONNX_SNN_KERNELS"
LIBRARY = Path(__file__).resolve().parent / "native" / "libonnx_snn_kernels.so"
BUILD_HINT = "build it with `bash scripts/build_kernels.sh` (scripts/setup.sh does it when it can)"


class KernelsError(OnnxSnnError):
    """Native kernels were asked for but the library is missing or does not load."""


def library() -> Path | None:
    """The library's path: ``$ONNX_SNN_KERNELS`` when set (an empty value disables the library),
    else the one built into the package; None when there is none."""
    if ENV in os.environ:
        value = os.environ[ENV]
        return Path(value) if value and Path(value).is_file() else None
    return LIBRARY if LIBRARY.is_file() else None


def available() -> bool:
    return library() is not None


def register(options: ort.SessionOptions) -> None:
    """Load the library into a session's options; KernelsError when it is missing or broken."""
    path = library()
    if path is None:
        where = os.environ.get(ENV) if ENV in os.environ else LIBRARY
        raise KernelsError(f"native kernels requested but the library is missing ({where or 'disabled by ' + ENV + '='}); "
                           f"{BUILD_HINT}, or use kernels='onnx'")
    try:
        options.register_custom_ops_library(str(path))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types
        raise KernelsError(f"the native kernel library {path} does not load into onnxruntime "
                           f"{ort.__version__} ({e}); rebuild it with `bash scripts/build_kernels.sh`") from e
