"""The native kernel library (``runtime/kernels/``, built by ``scripts/build_kernels.sh``).

It registers CPU kernels for every op of the ``onnx_snn`` domain; onnxruntime prefers a
registered kernel over the model's function body, so a session with the library runs the same
model faster and computes the same numbers. ``libonnx_snn_kernels_cuda.so``
(``scripts/build_kernels_cuda.sh``, where nvcc is) carries the same CPU kernels plus CUDA ones;
CUDA sessions load that one.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from .errors import OnnxSnnError

ENV = "ONNX_SNN_KERNELS"
LIBRARY = Path(__file__).resolve().parent / "native" / "libonnx_snn_kernels.so"
CUDA_LIBRARY = LIBRARY.with_name("libonnx_snn_kernels_cuda.so")
BUILD_HINT = "build it with `bash scripts/build_kernels.sh` (scripts/setup.sh does it when it can)"
CUDA_BUILD_HINT = "build it with `bash scripts/build_kernels_cuda.sh` (needs nvcc; scripts/setup.sh runs it where nvcc is)"


class KernelsError(OnnxSnnError):
    """Native kernels were asked for but the library is missing or does not load."""


def library(cuda: bool = False) -> Path | None:
    """The library's path: ``$ONNX_SNN_KERNELS`` when set (an empty value disables the library),
    else the one built into the package (``cuda``: the one with CUDA kernels); None when there is none."""
    if ENV in os.environ:
        value = os.environ[ENV]
        return Path(value) if value and Path(value).is_file() else None
    path = CUDA_LIBRARY if cuda else LIBRARY
    return path if path.is_file() else None


def available(cuda: bool = False) -> bool:
    return library(cuda) is not None


def register(options: ort.SessionOptions, cuda: bool = False) -> None:
    """Load the library into a session's options; KernelsError when it is missing or broken."""
    path = library(cuda)
    if path is None:
        where = os.environ.get(ENV) if ENV in os.environ else (CUDA_LIBRARY if cuda else LIBRARY)
        raise KernelsError(f"native {'CUDA ' if cuda else ''}kernels requested but the library is missing "
                           f"({where or 'disabled by ' + ENV + '='}); {CUDA_BUILD_HINT if cuda else BUILD_HINT}, "
                           "or use kernels='onnx'")
    try:
        options.register_custom_ops_library(str(path))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types
        raise KernelsError(f"the native kernel library {path} does not load into onnxruntime "
                           f"{ort.__version__} ({e}); rebuild it with `bash scripts/build_kernels.sh`") from e
