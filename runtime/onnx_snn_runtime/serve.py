"""Serve a step model through Triton Inference Server, using PyTriton (the ``serve`` extra).

Two Triton models, on HTTP and gRPC (loopback by default):

* ``<name>``, whole inference: inputs ``x`` (a batch, the step model's input shape), ``T``
  (int32, [1]) and optionally ``last_only`` (bool, [1]); outputs ``outputs``, the first model
  output summed over the timesteps after every t ([T, N, ...]; [1, N, ...] with last_only) and
  ``predictions`` (its argmax, [T, N] or [1, N]). Computed by ``Simulator.run``.
* ``<name>_stream``, one timestep per request: inputs ``sequence_id`` (uint64, [1]), ``x``, and
  optionally ``start`` and ``end`` (bool, [1]); outputs ``outputs`` (summed since the start,
  [N, ...]), ``predictions`` ([N]) and ``step`` (the t just computed, int64 [1]). The server keeps
  each live sequence's states (``SequenceStore``): at most ``max_sequences`` at once, dropped
  after ``idle_timeout`` seconds without a request, on ``end`` (after that step), or restarted
  by ``start`` on a live id. A sequence never sees another's state. Every request's batch is at
  most ``max_batch`` samples, so the states held are bounded by max_sequences x max_batch
  samples, and a whole-inference answer by max_T x max_batch.

Errors a client can cause (wrong shape or type, T out of range, an unknown or expired sequence,
too many live sequences) come back as inference errors that say what to do; the server goes on
serving everyone else.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import native
from . import providers as prov
from .data import prepare
from .engine import np_type
from .errors import DataError, OnnxSnnError
from .format import StepModelSpec
from .loop import check_T
from .simulator import Simulator

log = logging.getLogger(__name__)


class ServeError(OnnxSnnError):
    """A request the server refuses; the message goes back to the client."""


@dataclass
class _Sequence:
    states: dict[str, np.ndarray]
    sums: np.ndarray | None
    batch: int
    t: int = 0
    last: float = field(default_factory=time.monotonic)


class SequenceStore:
    """Live streaming sequences: their states, bounded in number, dropped when idle.

    One onnxruntime session of the whole step model runs every sequence's steps (session runs
    are thread-safe); the store's lock guards the table, and each step holds it only to fetch
    and to put back the sequence's states.
    """

    def __init__(self, model: bytes | str, provider: str = "CPUExecutionProvider", *, max_sequences: int = 64,
                 idle_timeout: float = 60.0, max_batch: int = 256, clock=time.monotonic):
        for name, value in (("max_sequences", max_sequences), ("max_batch", max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OnnxSnnError(f"{name}={value!r} must be a positive integer")
        self.max_batch = max_batch
        if not idle_timeout > 0:
            raise OnnxSnnError(f"idle_timeout={idle_timeout!r} must be positive (seconds)")
        # one step per request: the step model, with the native neuron kernel where it is built
        self.session = prov.session(model, provider, native=provider == "CPUExecutionProvider" and native.available())
        self.spec = StepModelSpec.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        state_inputs = {s.input for s in self.spec.states}
        self.inputs = [(i.name, list(i.shape), np_type(i.type)) for i in self.session.get_inputs()
                       if i.name not in state_inputs]
        self.output = next(iter(self.spec.outputs))
        self.max_sequences, self.idle_timeout, self.clock = max_sequences, idle_timeout, clock
        self._live: dict[int, _Sequence] = {}
        self._busy: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._live)

    def _expire(self, now: float) -> None:
        for sid in [s for s, seq in self._live.items() if now - seq.last > self.idle_timeout and s not in self._busy]:
            del self._live[sid]
            log.info("sequence %d expired after %.0f s idle", sid, self.idle_timeout)

    def step(self, sequence_id: int, x: np.ndarray, *, start: bool = False, end: bool = False) -> tuple[np.ndarray, int]:
        """One timestep of sequence ``sequence_id``: (first output summed since its start, t)."""
        name, shape, dtype = self.inputs[0]
        feeds = {name: check_batch(prepare(x, shape, dtype, name), self.max_batch)}
        n = len(feeds[name])
        now = self.clock()
        with self._lock:
            self._expire(now)
            if sequence_id in self._busy:
                raise ServeError(f"sequence {sequence_id} has a request in flight; send its steps one at a time")
            seq = self._live.get(sequence_id)
            if seq is None and not start:
                raise ServeError(f"sequence {sequence_id} is unknown or expired (idle > {self.idle_timeout:g} s); "
                                 "send start=true to begin it")
            created = seq is None
            if seq is None or start:
                if seq is None and not end and len(self._live) >= self.max_sequences:
                    raise ServeError(f"too many live sequences ({self.max_sequences}); end some (end=true) "
                                     f"or wait {self.idle_timeout:g} s for idle ones to expire")
                seq = _Sequence({s.input: s.initial(n) for s in self.spec.states}, None, n)
                self._live[sequence_id] = seq
            elif n != seq.batch:
                raise ServeError(f"sequence {sequence_id} was started with a batch of {seq.batch}, not {n}; "
                                 "send start=true to restart it with another batch")
            self._busy.add(sequence_id)
        try:
            names = [self.output] + [s.output for s in self.spec.states]
            values = self.session.run(names, {**feeds, **seq.states})
        except Exception as e:  # noqa: BLE001 - onnxruntime's own checks
            with self._lock:
                self._busy.discard(sequence_id)
                if created or end:  # a sequence that failed at its start, or was to end, is gone
                    self._live.pop(sequence_id, None)
            raise ServeError(f"the model refused the input: {e}") from e
        with self._lock:
            seq.states = {s.input: v for s, v in zip(self.spec.states, values[1:])}
            seq.sums = values[0] if seq.sums is None else seq.sums + values[0]
            seq.t += 1
            seq.last = self.clock()
            self._busy.discard(sequence_id)
            if end:
                self._live.pop(sequence_id, None)
            return seq.sums.copy(), seq.t


def check_batch(x: np.ndarray, max_batch: int) -> np.ndarray:
    """Refuse an empty batch and one past the server's limit (which bounds its memory)."""
    if len(x) == 0:
        raise ServeError("input 'x' holds no samples; send a batch of at least one")
    if len(x) > max_batch:
        raise ServeError(f"a batch of {len(x)} samples is over this server's limit of {max_batch}; "
                         "split it into several requests (or start the server with a larger --max-batch)")
    return x


def _scalar(requests_input, name: str, default=None, kind=None):
    if requests_input is None:
        if default is None:
            raise ServeError(f"input {name!r} is missing")
        return default
    value = np.asarray(requests_input).reshape(-1)
    if value.size != 1:
        raise ServeError(f"input {name!r} must hold one value, got shape {np.asarray(requests_input).shape}")
    return kind(value[0]) if kind else value[0]


class SNNServer:
    """The two inference callables and their Triton bindings (PyTriton)."""

    def __init__(self, model: str | bytes, *, name: str = "snn", provider=None, max_sequences: int = 64,
                 idle_timeout: float = 60.0, max_T: int = 1000, max_batch: int = 256):
        # no CUDA graphs: a captured graph keeps its batch size, and requests vary in size
        self.simulator = Simulator(model, provider, cuda_graph=False)
        data = bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)  # a path keeps external data
        self.store = SequenceStore(data, self.simulator.provider, max_sequences=max_sequences,
                                   idle_timeout=idle_timeout, max_batch=max_batch)
        self.max_batch = max_batch
        self.name, self.max_T = name, check_T(max_T)
        self._whole_lock = threading.Lock()
        input_name, shape, _ = self.simulator.inputs[0]
        self.input_shape = [-1] + [d if isinstance(d, int) else -1 for d in shape[1:]]

    def whole(self, requests):
        responses = []
        for request in requests:
            x = check_batch(np.asarray(request.data["x"]), self.max_batch)
            T = _scalar(request.data.get("T"), "T", kind=int)
            if not 0 < T <= self.max_T:
                raise ServeError(f"T={T} is out of range; this server simulates 1 to {self.max_T} timesteps")
            last = bool(_scalar(request.data.get("last_only"), "last_only", default=False))
            with self._whole_lock:  # one Simulator: its buffers serve one batch at a time
                try:
                    out = self.simulator.run(x, T, per_step=not last)
                except DataError as e:
                    raise ServeError(str(e)) from e
            out = out[None] if last else out
            responses.append({"outputs": out.astype(np.float32),
                              "predictions": out.reshape(out.shape[0], out.shape[1], -1).argmax(-1).astype(np.int64)})
        return responses

    def stream(self, requests):
        responses = []
        for request in requests:
            sid = _scalar(request.data.get("sequence_id"), "sequence_id", kind=int)
            start = bool(_scalar(request.data.get("start"), "start", default=False))
            end = bool(_scalar(request.data.get("end"), "end", default=False))
            try:
                sums, t = self.store.step(sid, request.data["x"], start=start, end=end)
            except DataError as e:
                raise ServeError(str(e)) from e
            responses.append({"outputs": sums.astype(np.float32),
                              "predictions": sums.reshape(len(sums), -1).argmax(-1).astype(np.int64),
                              "step": np.array([t], np.int64)})
        return responses

    def bind(self, triton) -> None:
        from pytriton.model_config import ModelConfig, Tensor
        rank = next(len(o.shape) for o in self.store.session.get_outputs() if o.name == self.store.output)
        x = Tensor(name="x", dtype=np.float32, shape=tuple(self.input_shape))
        triton.bind(model_name=self.name, infer_func=self.whole,
                    inputs=[x, Tensor(name="T", dtype=np.int32, shape=(1,)),
                            Tensor(name="last_only", dtype=np.bool_, shape=(1,), optional=True)],
                    outputs=[Tensor(name="outputs", dtype=np.float32, shape=(-1,) * (rank + 1)),
                             Tensor(name="predictions", dtype=np.int64, shape=(-1, -1))],
                    config=ModelConfig(batching=False), strict=True)
        triton.bind(model_name=f"{self.name}_stream", infer_func=self.stream,
                    inputs=[Tensor(name="sequence_id", dtype=np.uint64, shape=(1,)), x,
                            Tensor(name="start", dtype=np.bool_, shape=(1,), optional=True),
                            Tensor(name="end", dtype=np.bool_, shape=(1,), optional=True)],
                    outputs=[Tensor(name="outputs", dtype=np.float32, shape=(-1,) * rank),
                             Tensor(name="predictions", dtype=np.int64, shape=(-1,)),
                             Tensor(name="step", dtype=np.int64, shape=(1,))],
                    config=ModelConfig(batching=False), strict=True)


def check_python(version=None) -> None:
    """PyTriton 0.7's Python-backend stub is built against CPython 3.11 before 3.11.6; with the
    standard library of 3.11.6+ its models fail to load (``RLock._recursion_count``, pytriton
    issue #51). Refuse up front with the remedy rather than after a minute of server start-up."""
    v = version or sys.version_info
    if tuple(v[:2]) == (3, 11) and v[2] >= 6:
        raise OnnxSnnError(f"serving with PyTriton fails on Python {v[0]}.{v[1]}.{v[2]} (its server's Python stub "
                           "predates 3.11.6); create the environment with Python 3.11.5 or older, such as "
                           "Debian 12's /usr/bin/python3 (scripts/setup.sh picks it when present)")


def serve(model, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, name: str = "snn", provider=None, max_sequences: int = 64,
          idle_timeout: float = 60.0, max_T: int = 1000, max_batch: int = 256, block: bool = True):
    """Start Triton with the two models. ``block=True`` serves until interrupted; else returns
    the running ``pytriton.triton.Triton`` (call ``.stop()``)."""
    check_python()
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise OnnxSnnError("serving needs PyTriton: pip install 'onnx-snn[serve]' "
                           "(see the serving guide, docs/serving.md)") from e
    server = SNNServer(model, name=name, provider=provider, max_sequences=max_sequences,
                       idle_timeout=idle_timeout, max_T=max_T, max_batch=max_batch)
    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          metrics_port=metrics_port, exit_timeout_secs=2, log_verbose=0)
    triton = Triton(config=config)
    triton.__enter__()
    try:
        server.bind(triton)
        if block:
            log.info("serving %s on %s (HTTP %d, gRPC %d)", name, host, http_port, grpc_port)
            triton.serve()
            return None
        triton.run()
        return triton
    except BaseException:
        triton.stop()
        raise
