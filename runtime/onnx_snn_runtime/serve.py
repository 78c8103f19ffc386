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

Errors a client can cause (wrong shape or type, T out of range, NaN or infinite inputs, an empty
or too large batch, an unknown or expired sequence, too many live sequences) come back as
INVALID_ARGUMENT (HTTP 400) with one line that says what to do, and one log line on the server
(``STUB_PATCH``); the server goes on serving everyone else. Whole inference runs on several
model instances, so a small request is not queued behind a long one.

Shutdown (SIGINT or SIGTERM with ``block=True``, else ``Serving.stop``): the models are unloaded,
so that their stubs end cleanly, then Triton stops, and the workspace is removed; within 10 s.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    """The inference callables and their Triton bindings (PyTriton).

    Whole inference runs on ``instances`` model instances, each with its own ``Simulator``, so
    that a small request is not queued behind a long one (Triton hands a request to a free
    instance); the CPU's cores are shared out between them. Streaming steps share one
    ``SequenceStore`` on one instance: a step is short.
    """

    def __init__(self, model: str | bytes, *, name: str = "snn", provider=None, max_sequences: int = 64,
                 idle_timeout: float = 60.0, max_T: int = 1000, max_batch: int = 256, instances: int = 2,
                 threads: int | None = None):
        for option, value in (("instances", instances), ("threads", 1 if threads is None else threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OnnxSnnError(f"{option}={value!r} must be a positive integer")
        threads = threads or max(1, (os.cpu_count() or 1) // instances)
        # no CUDA graphs: a captured graph keeps its batch size, and requests vary in size
        self.simulators = [Simulator(model, provider, cuda_graph=False, threads=threads) for _ in range(instances)]
        self.simulator = self.simulators[0]
        data = bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)  # a path keeps external data
        self.store = SequenceStore(data, self.simulator.provider, max_sequences=max_sequences,
                                   idle_timeout=idle_timeout, max_batch=max_batch)
        self.max_batch = max_batch
        self.name, self.max_T = name, check_T(max_T)
        self._locks = [threading.Lock() for _ in self.simulators]
        input_name, shape, _ = self.simulator.inputs[0]
        self.input_shape = [-1] + [d if isinstance(d, int) else -1 for d in shape[1:]]

    def whole(self, requests, instance: int = 0):
        responses = []
        for request in requests:
            x = check_finite(check_batch(np.asarray(request.data["x"]), self.max_batch))
            T = _scalar(request.data.get("T"), "T", kind=int)
            if not 0 < T <= self.max_T:
                raise ServeError(f"T={T} is out of range; this server simulates 1 to {self.max_T} timesteps")
            last = bool(_scalar(request.data.get("last_only"), "last_only", default=False))
            with self._locks[instance]:  # one Simulator's buffers serve one batch at a time
                try:
                    out = self.simulators[instance].run(x, T, per_step=not last)
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
                sums, t = self.store.step(sid, check_finite(np.asarray(request.data["x"])), start=start, end=end)
            except DataError as e:
                raise ServeError(str(e)) from e
            responses.append({"outputs": sums.astype(np.float32),
                              "predictions": sums.reshape(len(sums), -1).argmax(-1).astype(np.int64),
                              "step": np.array([t], np.int64)})
        return responses

    def _whole_callables(self) -> list:
        def instance(k):
            def whole(requests):
                return self.whole(requests, k)
            whole.__name__ = f"whole_{k}"
            return whole
        return [instance(k) for k in range(len(self.simulators))]

    def bind(self, triton) -> None:
        from pytriton.model_config import ModelConfig, Tensor
        rank = next(len(o.shape) for o in self.store.session.get_outputs() if o.name == self.store.output)
        x = Tensor(name="x", dtype=np.float32, shape=tuple(self.input_shape))
        triton.bind(model_name=self.name, infer_func=self._whole_callables(),
                    inputs=[x, Tensor(name="T", dtype=np.int32, shape=(1,)),
                            Tensor(name="last_only", dtype=np.bool_, shape=(1,), optional=True)],
                    outputs=[Tensor(name="outputs", dtype=np.float32, shape=(-1,) * (rank + 1)),
                             Tensor(name="predictions", dtype=np.int64, shape=(-1, -1))],
                    config=ModelConfig(batching=False), strict=True)
        # one streaming instance: a step is short, and each instance's stub adds a second to stop()
        triton.bind(model_name=f"{self.name}_stream", infer_func=self.stream,
                    inputs=[Tensor(name="sequence_id", dtype=np.uint64, shape=(1,)), x,
                            Tensor(name="start", dtype=np.bool_, shape=(1,), optional=True),
                            Tensor(name="end", dtype=np.bool_, shape=(1,), optional=True)],
                    outputs=[Tensor(name="outputs", dtype=np.float32, shape=(-1,) * rank),
                             Tensor(name="predictions", dtype=np.int64, shape=(-1,)),
                             Tensor(name="step", dtype=np.int64, shape=(1,))],
                    config=ModelConfig(batching=False), strict=True)


def check_finite(x: np.ndarray) -> np.ndarray:
    """Refuse NaN and infinities, as the converter refuses them in calibration data."""
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.ndim else np.array([True])
        raise ServeError(f"input 'x' holds NaN or infinite values (in {int(bad.sum())} of {len(bad)} samples, "
                         f"the first at index {int(np.argmax(bad))}); send finite values")
    return x


REFUSAL = "ServeError: "  # how a refusal's message starts in the traceback PyTriton passes on


def _onnx_snn_retry_refused(call):
    """``call``, retried for 5 s while the Unix socket it connects to refuses. PyTriton 0.7 races
    with several instances: the handshake socket's file exists before its server listens. Used
    here and, by its source, in ``STUB_PATCH`` (the stub's side of the same handshake)."""
    def retrying(*args, **kwargs):
        import time as _time
        for _ in range(100):
            try:
                return call(*args, **kwargs)
            except ConnectionRefusedError:
                _time.sleep(0.05)
        return call(*args, **kwargs)
    return retrying


# PyTriton answers every exception of an inference callable as INTERNAL (HTTP 500) with the
# traceback, and its stub (the model.py it copies into Triton's model repository) has no hook
# for error codes. So onnx-snn appends this to that copy: a request onnx-snn refused
# (``ServeError``) is answered INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) with the error's
# one-line message; every other error stays as PyTriton reports it.
STUB_PATCH = f"""

# --- appended by onnx-snn (onnx_snn_runtime/serve.py: STUB_PATCH) ---
_ONNX_SNN_REFUSAL = {REFUSAL!r}
# PyTriton's stub cannot pass an empty tensor on (its copy into shared memory fails)
_ONNX_SNN_EMPTY = "cannot cast view with zeros in shape"
_onnx_snn_execute = TritonPythonModel.execute


def _onnx_snn_execute_with_refusals(self, triton_requests):
    try:
        return _onnx_snn_execute(self, triton_requests)
    except pb_utils.TritonModelException as e:  # pytype: disable=module-attr
        text = str(e)
        at = text.rfind(_ONNX_SNN_REFUSAL)
        if at >= 0:
            line = text[at + len(_ONNX_SNN_REFUSAL):].split("\\n", 1)[0].strip()
        elif _ONNX_SNN_EMPTY in text:
            line = "an input holds no values (a dimension of size 0); send a batch of at least one sample"
        else:
            raise
        error = pb_utils.TritonError(line, pb_utils.TritonError.INVALID_ARG)  # pytype: disable=module-attr
        return [pb_utils.InferenceResponse(error=error) for _ in triton_requests]  # pytype: disable=module-attr


TritonPythonModel.execute = _onnx_snn_execute_with_refusals


{inspect.getsource(_onnx_snn_retry_refused)}

get_config_from_handshake_server = _onnx_snn_retry_refused(get_config_from_handshake_server)  # read by initialize()
"""


@contextlib.contextmanager
def _refusals_as_invalid_argument():
    """While binding and loading: the model.py that PyTriton hands to Triton (as files sent with
    the load request, or written into a local model store) gets ``STUB_PATCH`` appended, and
    PyTriton's handshake with the stubs retries a refused connection."""
    from pytriton.models import model as pytriton_model
    cls = pytriton_model.Model
    files, generate = cls.get_proxy_model_files, cls.generate_model

    def patched(text: str) -> str:
        if "class TritonPythonModel" not in text:
            raise OnnxSnnError("PyTriton's model stub has no TritonPythonModel; this PyTriton version is not "
                               "supported by onnx-snn serve (tested: nvidia-pytriton 0.7)")
        return text + STUB_PATCH

    def get_proxy_model_files(self):
        result = files(self)
        key = f"file:{self.model_version}/model.py"
        result[key] = patched(result[key].decode()).encode()
        return result

    def generate_model(self, model_repository):
        generate(self, model_repository)
        stub = Path(model_repository) / self.model_name / str(self.model_version) / "model.py"
        stub.write_text(patched(stub.read_text()))

    # the same race as in STUB_PATCH, on this side: PyTriton reads the first instance's handshake
    get_config = pytriton_model.get_config_from_handshake_server

    cls.get_proxy_model_files, cls.generate_model = get_proxy_model_files, generate_model
    pytriton_model.get_config_from_handshake_server = _onnx_snn_retry_refused(get_config)
    try:
        yield
    finally:
        cls.get_proxy_model_files, cls.generate_model = files, generate
        pytriton_model.get_config_from_handshake_server = get_config


class _OneLinePerRefusal(logging.Filter):
    """PyTriton logs each failed request with its traceback; a refusal becomes one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        at = text.rfind(REFUSAL)
        if at >= 0:
            record.msg, record.args = "refused a request: %s", (text[at + len(REFUSAL):].split("\n", 1)[0],)
        return True


def check_python(version=None) -> None:
    """PyTriton 0.7's Python-backend stub is built against CPython 3.11 before 3.11.6; with the
    standard library of 3.11.6+ its models fail to load (``RLock._recursion_count``, pytriton
    issue #51). Refuse up front with the remedy rather than after a minute of server start-up."""
    v = version or sys.version_info
    if tuple(v[:2]) == (3, 11) and v[2] >= 6:
        raise OnnxSnnError(f"serving with PyTriton fails on Python {v[0]}.{v[1]}.{v[2]} (its server's Python stub "
                           "predates 3.11.6); create the environment with Python 3.11.5 or older, such as "
                           "Debian 12's /usr/bin/python3 (scripts/setup.sh picks it when present)")


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Refuse a port already in use before starting Triton (whose own message is buried in its
    log); ``ports`` maps each option's name to its port (0 = not used)."""
    for option, port in ports.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise OnnxSnnError(f"{option} {port!r} is not a port number (0 to 65535)")
    used = [p for p in ports.values() if p]
    if len(set(used)) != len(used):
        raise OnnxSnnError("the ports must differ: " + ", ".join(f"{o} {p}" for o, p in ports.items() if p))
    for option, port in ports.items():
        if not port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            # as servers do: a closed connection's TIME_WAIT does not hold the port, a listener does
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise OnnxSnnError(f"port {port} on {host} is already in use ({option} {port}): {e.strerror}; "
                                   f"stop what holds it or choose another with {option}") from e


class Serving:
    """A running server: ``stop()`` (or leaving a ``with`` block) stops Triton and its model
    stubs and removes the workspace (model repository, sockets)."""

    def __init__(self, triton, workspace: str, server: SNNServer, url: str):
        self.triton, self.workspace, self.server, self.url = triton, workspace, server, url
        self._stopped = False

    def is_alive(self) -> bool:
        return not self._stopped and self.triton.is_alive()

    def stop(self) -> None:
        """Unload the models first, so that their stubs end cleanly (they release their shared
        memory), then stop Triton: it waits at most ``EXIT_TIMEOUT`` s for clients' idle
        keep-alive connections, which nothing in flight needs any more."""
        if self._stopped:
            return
        self._stopped = True
        try:
            start = time.monotonic()
            self._unload()
            log.debug("models unloaded, their stubs ended: %.1f s", time.monotonic() - start)
            self.triton.stop()
            log.debug("Triton stopped: %.1f s", time.monotonic() - start)
        finally:
            shutil.rmtree(self.workspace, ignore_errors=True)

    def _unload(self) -> None:
        try:
            import tritonclient.http as httpclient
            from pytriton.client.auth import create_auth_headers
            # PyTriton restricts the model-repository endpoints to its access token
            headers = create_auth_headers(self.triton.get_access_token(), "http")
            client = httpclient.InferenceServerClient(self.url, network_timeout=EXIT_TIMEOUT)
            try:
                for name in (f"{self.server.name}_stream", self.server.name):
                    client.unload_model(name, headers=headers)
            finally:
                client.close()
        except Exception as e:  # noqa: BLE001 - Triton may be gone already; stop() follows anyway
            log.debug("unloading before stop: %s", e)
            return
        # an unload returns at once; the stubs end a moment later
        deadline = time.monotonic() + STUB_WAIT
        while _descendants("triton_python_backend_stub") and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path on Linux (sun_path, less its final NUL)


def _workspace(name: str) -> str:
    """A new folder for PyTriton's model store and Unix sockets. The longest socket path is
    ``<folder>/w/<name>_stream_0_0-server.sock``; a long TMPDIR gives way to /tmp."""
    def longest(base: str) -> int:
        return len(os.path.join(base, "onnx-snn-serve-12345678", "w", f"{name}_stream_0_0-server.sock").encode())
    base = tempfile.gettempdir()
    if longest(base) > SOCKET_PATH_MAX and os.path.isdir("/tmp") and longest("/tmp") <= SOCKET_PATH_MAX:
        log.info("the temporary folder %s is too long for Unix socket paths; using /tmp", base)
        base = "/tmp"
    if longest(base) > SOCKET_PATH_MAX:
        raise OnnxSnnError(f"the model name {name!r} is too long for the server's Unix socket paths "
                           f"(at most {SOCKET_PATH_MAX} bytes); choose a shorter --name")
    return tempfile.mkdtemp(prefix="onnx-snn-serve-", dir=base)


def _descendants(name: str) -> list[int]:
    """Process ids below this one whose command line contains ``name`` (Linux /proc; none elsewhere)."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
    found, frontier = [], [os.getpid()]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += [pid for pid in children if name in commands.get(pid, "")]
        frontier = children
    return found


def serve(model, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, name: str = "snn", provider=None, max_sequences: int = 64,
          idle_timeout: float = 60.0, max_T: int = 1000, max_batch: int = 256, instances: int = 2,
          threads: int | None = None, block: bool = True, ready=None, verbose: bool = False):
    """Start Triton with the two models; ``metrics_port=0`` turns metrics off.

    ``block=True`` serves until SIGINT or SIGTERM, then stops Triton and its stubs, removes the
    workspace and returns; ``ready()`` is called once the models are ready. ``block=False``
    returns a running ``Serving`` (call ``.stop()``). ``verbose`` passes Triton's own log through.
    """
    check_python()
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise OnnxSnnError("serving needs PyTriton: pip install 'onnx-snn[serve]' "
                           "(see the serving guide, docs/serving.md)") from e
    check_ports(host, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
    server = SNNServer(model, name=name, provider=provider, max_sequences=max_sequences,
                       idle_timeout=idle_timeout, max_T=max_T, max_batch=max_batch, instances=instances,
                       threads=threads)
    _quiet_pytriton(verbose)
    workspace = _workspace(name)
    options = dict(metrics_port=metrics_port) if metrics_port else dict(allow_metrics=False)
    if not verbose:  # Triton's own log goes to a file in the workspace instead of stdout
        options["log_file"] = Path(workspace) / "triton.log"
    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          exit_timeout_secs=EXIT_TIMEOUT, log_verbose=1 if verbose else 0, **options)
    stop = threading.Event()
    previous = {}
    if block:  # before Triton starts, so that a signal during start-up also stops cleanly
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    serving = None
    try:
        # PyTriton creates its workspace itself (it must not exist); ours is the folder around it
        serving = Serving(Triton(config=config, workspace=Path(workspace) / "w"), workspace, server,
                          f"{'[' + host + ']' if ':' in host else host}:{http_port}")
        with _refusals_as_invalid_argument():
            serving.triton.__enter__()
            server.bind(serving.triton)
            serving.triton.run()
        log.info("serving %s on %s (HTTP %d, gRPC %d)", name, host, http_port, grpc_port)
        if ready is not None:
            ready()
        if not block:
            return serving
        while not stop.wait(0.5):
            if not serving.is_alive():
                raise OnnxSnnError("Triton stopped on its own; run with -v to see its log")
        log.info("stopping")
        return None
    except BaseException:
        block = True  # never leave a half-started server behind
        raise
    finally:
        if block:
            if serving is not None:
                serving.stop()
            shutil.rmtree(workspace, ignore_errors=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# stop() ends within 10 s: the unloaded models' stubs get STUB_WAIT s to end (in-flight requests
# finish first), then Triton waits EXIT_TIMEOUT s for clients' idle connections
STUB_WAIT, EXIT_TIMEOUT = 5.0, 2


def _quiet_pytriton(verbose: bool) -> None:
    """Refusals as one line each; PyTriton's and Triton's chatter only with ``verbose``."""
    logging.getLogger("pytriton.proxy.inference").addFilter(_OneLinePerRefusal())
    if not verbose:
        # its shutdown reports Triton's exit-timeout error for idle client connections as a failure
        logging.getLogger("pytriton").setLevel(logging.ERROR)
        logging.getLogger("pytriton.proxy.inference").setLevel(logging.WARNING)  # refusals, one line each
