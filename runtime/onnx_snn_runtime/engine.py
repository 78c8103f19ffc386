"""The stepping engine: IO binding, device-resident ping-pong state buffers, optional CUDA graphs.

Every state has two buffers on the session's device; even steps read buffer 0 and write
buffer 1, odd steps the reverse, through two IO bindings made once per batch shape, so no
state ever crosses to the host between steps. With CUDA graphs each of the two bindings is
captured as its own graph (``gpu_graph_id``), which needs fixed buffer addresses: buffers are
kept across batches of the same size and refilled in place, and a smaller last batch is
padded by the caller.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from . import providers as prov
from .errors import OnnxSnnError
from .format import OUTPUT_SUM, SpikeCount, State

log = logging.getLogger(__name__)
_graph_ids = itertools.count(1)


@dataclass
class Plan:
    """What to run: ``prefix`` once per input, ``body`` once per step (serialized ONNX models)."""
    prefix: bytes | None
    body: bytes
    boundary: list[str]               # body inputs that come from the input (or the prefix)
    states: list[State]
    outputs: list[str]                # decoded outputs, in order
    spike_counts: list[SpikeCount] = field(default_factory=list)

    @property
    def accumulators(self) -> dict[str, State]:
        return {s.layer: s for s in self.states if s.kind == OUTPUT_SUM}


class Engine:
    def __init__(self, plan: Plan, provider: str, *, cuda_graph="auto", threads=None, device_id=0, optimize=True,
                 native=False):
        self.plan, self.device_id, self.threads = plan, device_id, threads
        opts = dict(threads=threads, device_id=device_id, optimize=optimize, native=native)
        self.prefix = prov.session(plan.prefix, provider, **opts) if plan.prefix else None
        fixed_shapes = set(plan.accumulators) == set(plan.outputs)
        want_graph = provider == "CUDAExecutionProvider" and cuda_graph in ("auto", True) and fixed_shapes
        if cuda_graph is True and not want_graph:
            raise prov.ProviderError("CUDA graphs need the CUDA provider and a step model with a runtime form "
                                     "(converted by onnx-snn); use cuda_graph='auto' or False")
        self.cuda_graph, self.cuda_graph_reason = False, "off: " + (
            "CPU provider" if provider != "CUDAExecutionProvider" else
            "not requested" if cuda_graph is False else "outputs are not accumulated on the device")
        self.body = None
        if want_graph:
            try:
                self.body = prov.session(plan.body, provider, cuda_graph=True, **opts)
                self.cuda_graph, self.cuda_graph_reason = True, "on"
            except prov.ProviderError as e:
                self.cuda_graph_reason = f"off: session with CUDA graphs failed ({e})"
                log.warning("CUDA graphs unavailable, running without: %s", e)
        if self.body is None:
            self.body = prov.session(plan.body, provider, **opts)
        active = self.body.get_providers()[0]
        if provider == "CUDAExecutionProvider" and active != provider:
            raise prov.ProviderError("the CUDA provider could not start (CUDA or cuDNN libraries missing?); "
                                     "use providers='cpu'")
        self.device = "cuda" if active == "CUDAExecutionProvider" else "cpu"
        self.batch: int | None = None
        self._boundary: dict[str, ort.OrtValue] = {}
        self._provider, self._session_options = provider, opts

    # -- buffers -------------------------------------------------------------------------------
    def _ortvalue(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def _allocate(self, batch: int) -> None:
        self.batch = None  # set once every buffer exists: a failed allocation must not pin a size
        self._buffers = {s.input: [self._ortvalue(s.initial(batch)), self._ortvalue(s.initial(batch))]
                         for s in self.plan.states}
        types = {o.name: o.type for o in self.body.get_outputs()}
        self._counts = {c.output: self._ortvalue(np.zeros(batch, np_type(types[c.output])))
                        for c in self.plan.spike_counts}
        self._bindings = [self.body.io_binding(), self.body.io_binding()]
        # No RunOptions without CUDA graphs: onnxruntime's Python wrapper looks up gpu_graph_id in
        # any RunOptions given, and a missing entry costs an exception (36 us a step on the CPU).
        self._run_options = [None, None]
        if self.cuda_graph:
            self._run_options = [ort.RunOptions(), ort.RunOptions()]
            for ro in self._run_options:
                ro.add_run_config_entry("gpu_graph_id", str(next(_graph_ids)))
        self._bound = False
        self.batch = batch

    def _bind(self) -> None:
        host_outputs = [o for o in self.plan.outputs if o not in self.plan.accumulators]
        for parity, binding in enumerate(self._bindings):
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            for name in self.plan.boundary:
                binding.bind_ortvalue_input(name, self._boundary[name])
            for s in self.plan.states:
                binding.bind_ortvalue_input(s.input, self._buffers[s.input][parity])
                binding.bind_ortvalue_output(s.output, self._buffers[s.input][1 - parity])
            for name, value in self._counts.items():
                binding.bind_ortvalue_output(name, value)
            for name in host_outputs:
                binding.bind_output(name, self.device, self.device_id)
        self._bound = True

    def _without_cuda_graph(self, error: Exception) -> None:
        log.warning("CUDA graph capture failed, running without: %s", error)
        self.cuda_graph, self.cuda_graph_reason = False, f"off: capture failed ({error})"
        self.body = prov.session(self.plan.body, self._provider, **self._session_options)
        self._bindings = [self.body.io_binding(), self.body.io_binding()]
        self._run_options = [None, None]
        self._bind()

    # -- stepping ------------------------------------------------------------------------------
    def reset(self, batch: int) -> None:
        """Start a new sequence of ``batch`` samples: states back to their initial values."""
        if self.batch != batch or not self.cuda_graph:
            self._allocate(batch)
            self._boundary = {}
        else:
            for s in self.plan.states:
                self._buffers[s.input][0].update_inplace(np.ascontiguousarray(s.initial(batch)))
        self._parity = 0
        self._host_sums = None

    def set_input(self, feeds: dict[str, np.ndarray]) -> None:
        """Compute the boundary tensors (the prefix) from this input; they stay on the device."""
        reuse = bool(self._boundary) and self.cuda_graph
        if self.prefix is not None:
            binding = self.prefix.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            for name in self.plan.boundary:
                if reuse:
                    binding.bind_ortvalue_output(name, self._boundary[name])
                else:
                    binding.bind_output(name, self.device, self.device_id)
            self.prefix.run_with_iobinding(binding)
            if not reuse:
                self._boundary = dict(zip(self.plan.boundary, binding.get_outputs()))
                self._bound = False
        else:
            for name in self.plan.boundary:
                if reuse:
                    self._boundary[name].update_inplace(np.ascontiguousarray(feeds[name]))
                else:
                    self._boundary[name] = self._ortvalue(feeds[name])
                    self._bound = False
        if not self._bound:
            self._bind()

    def advance(self, fetch_outputs: bool = True, fetch_counts: bool = False):
        """One timestep. Returns (decoded outputs summed so far, spike counts) as host arrays when asked."""
        parity = self._parity
        try:
            self.body.run_with_iobinding(self._bindings[parity], self._run_options[parity])
        except Exception as e:  # noqa: BLE001 - a capture can fail at the first run, not at load
            if not self.cuda_graph:
                raise
            self._without_cuda_graph(e)  # inputs are untouched: this step can simply run again
            self.body.run_with_iobinding(self._bindings[parity], self._run_options[parity])
        binding = self._bindings[parity]
        self._parity ^= 1
        outputs = counts = None
        accumulators = self.plan.accumulators
        if len(accumulators) < len(self.plan.outputs):  # a step model without a runtime form
            step_values = dict(zip([o for o in self.plan.outputs if o not in accumulators],
                                   binding.get_outputs()[-(len(self.plan.outputs) - len(accumulators)):]))
            step = {k: _host(v) for k, v in step_values.items()}
            self._host_sums = step if self._host_sums is None else {k: self._host_sums[k] + v for k, v in step.items()}
        if fetch_outputs:
            outputs = {}
            for name in self.plan.outputs:
                if name in accumulators:
                    outputs[name] = _host(self._buffers[accumulators[name].input][1 - parity])
                else:
                    outputs[name] = self._host_sums[name].copy()
        if fetch_counts:
            counts = {c.layer: _host(self._counts[c.output]) for c in self.plan.spike_counts}
        return outputs, counts


_NP_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def np_type(onnx_type: str) -> np.dtype:
    """numpy dtype of an onnxruntime type string such as 'tensor(float)' (floating types only)."""
    if onnx_type not in _NP_TYPES:
        raise OnnxSnnError(f"tensor type {onnx_type} is not supported by the simulator; use float, double or float16")
    return np.dtype(_NP_TYPES[onnx_type])


def _host(value: ort.OrtValue) -> np.ndarray:
    """A host copy: on the CPU, ``numpy()`` is a view of a buffer the next step overwrites."""
    return np.array(value.numpy(), copy=True)
