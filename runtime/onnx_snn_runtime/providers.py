"""Choosing onnxruntime execution providers, with errors that say what to install."""
from __future__ import annotations

import logging
import os
import shutil

import onnxruntime as ort

from .errors import OnnxSnnError

log = logging.getLogger(__name__)
ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
SUPPORTED = ("CPUExecutionProvider", "CUDAExecutionProvider")


class ProviderError(OnnxSnnError):
    """An execution provider was asked for that is not installed or cannot start."""


def gpu_present() -> bool:
    """A cheap check that avoids onnxruntime's loud CUDA load errors on machines without a GPU."""
    return (os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
            or shutil.which("nvidia-smi") is not None)


def resolve(providers) -> tuple[str, bool]:
    """(provider name, explicitly requested) from None, 'cpu', 'cuda', a full name or a list."""
    if providers is None:
        if "CUDAExecutionProvider" in ort.get_available_providers() and gpu_present():
            return "CUDAExecutionProvider", False
        return "CPUExecutionProvider", False
    if isinstance(providers, (list, tuple)):
        if not providers:
            raise ProviderError("providers is empty; give 'cpu', 'cuda' or leave it out")
        providers = providers[0]
        providers = providers[0] if isinstance(providers, tuple) else providers
    name = ALIASES.get(str(providers).lower(), str(providers))
    if name not in SUPPORTED:
        raise ProviderError(f"provider {providers!r} is not supported; use one of cpu, cuda")
    if name not in ort.get_available_providers():
        raise ProviderError(f"provider {name} is not installed in this onnxruntime "
                            f"(available: {', '.join(ort.get_available_providers())}); "
                            "install onnxruntime-gpu for CUDA")
    return name, True


def session(model: bytes | str, provider: str, *, cuda_graph: bool = False, threads: int | None = None,
            device_id: int = 0, optimize: bool = True, native: bool = False,
            spinning: bool = True) -> ort.InferenceSession:
    """A session on ``provider``; ``native`` registers the neuron kernel library (native.py).

    ``spinning=False`` lets the session's idle intra-op threads sleep at once. A session run
    once per batch (the prefix) must not keep spinning while the next session (the chunk
    model) runs: on the 2-core machine the spinning prefix threads made each batch-1 chunk
    call 3.8x slower (9.2 against 2.4 ms per image, T = 50)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if native:
        from . import native as native_kernels
        native_kernels.register(opts, cuda=provider == "CUDAExecutionProvider")
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if provider == "CUDAExecutionProvider":
        # TF32 convolutions (onnxruntime's default on Ampere and later) round currents at 1e-3,
        # enough to move spikes a step; an SNN's timing is only as exact as its arithmetic
        options = {"device_id": str(device_id), "use_tf32": "0"}
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        chosen = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    else:
        chosen = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(model, opts, providers=chosen)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types
        raise ProviderError(f"onnxruntime could not create a session on {provider}: {e}") from e
