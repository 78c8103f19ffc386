"""``Simulator``: run an SNN step model over T timesteps with onnxruntime (no torch, no converter)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import native
from . import providers as prov
from .chunked import ChunkEngine
from .data import Feeder, labelled_batches
from .engine import Engine, Plan, np_type
from .errors import DataError, OnnxSnnError
from .format import KEY_RUNTIME_FORM, MEMBRANE, RuntimeForm, StepModelSpec
from .loop import check_T

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Accuracy after every timestep (index t-1 for t = 1..T) and per-layer mean firing rates."""
    T: int
    samples: int
    accuracy: np.ndarray
    firing_rates: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [T] spikes/neuron/step

    def checkpoints(self) -> list[int]:
        """t = 1, 2, 4, 8, ... and T."""
        ts, t = [], 1
        while t < self.T:
            ts.append(t)
            t *= 2
        return ts + [self.T]

    def to_json(self) -> dict:
        return {"T": self.T, "samples": self.samples, "accuracy": [float(a) for a in self.accuracy],
                "firing_rates": {k: [float(r) for r in v] for k, v in self.firing_rates.items()}}


# Images per slice of a CPU batch: on the 2-core dev machine the sample CNN ran 11.0k img*steps/s
# in slices of 50 against 6.4k for a batch of 1000 at once (states and activations stay in cache).
CPU_SLICE = 64
EXECUTIONS = ("auto", "chunk", "step")
KERNELS = ("auto", "native", "onnx")
# Chunk execution: K is the largest number of steps whose activations fit this many bytes
# (estimated as 3 tensors per neuron per step: current, spikes and the next layer's input).
CHUNK_MEMORY = 64 << 20
ACTIVATIONS_PER_NEURON = 3


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise OnnxSnnError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


class Simulator:
    """Loops an SNN step model over timesteps.

    Args:
        model: path to a step model (``.snn.onnx``) or its bytes.
        providers: ``None`` (CUDA when a GPU is usable, else CPU), ``"cpu"``, ``"cuda"`` or a list.
        cuda_graph: ``"auto"`` (on with CUDA when shapes allow), ``True`` or ``False``.
        runtime_form: use the converter's split model (input layers once per batch); ``False``
            runs the whole step graph every step.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice). Chunk execution
            treats it as the most: chunks of at most 16 samples run on one thread, measured faster.
        optimize: onnxruntime graph optimizations (default on). They fuse e.g. ``Conv -> Mul(1/λ)``
            into one Conv with rescaled weights, which rounds differently in the last bit, so a
            neuron right at its threshold may fire one step earlier or later. ``False`` runs the
            graph exactly as written: bit-exact to the reference semantics, slower.
        execution: ``"chunk"`` advances K steps per onnxruntime call through the runtime form's
            chunk model, ``"step"`` one step per call; ``"auto"`` (default) takes chunk on the
            CPU provider, step on CUDA (README, "Speed", says why).
        kernels: ``"native"`` runs the neuron ops with the kernel library (an error when it is
            not built), ``"onnx"`` with the model's function bodies; ``"auto"`` (default): native
            on the CPU provider when the library is built, else onnx.
        chunk_memory: bytes of activations one chunk may hold; sets K for ``run``/``evaluate``.
    """

    def __init__(self, model: str | os.PathLike | bytes, providers=None, *, cuda_graph="auto",
                 runtime_form: bool = True, threads: int | None = None, device_id: int = 0,
                 optimize: bool = True, execution: str = "auto", kernels: str = "auto",
                 chunk_memory: int = CHUNK_MEMORY):
        _choice("execution", execution, EXECUTIONS)
        _choice("kernels", kernels, KERNELS)
        if isinstance(chunk_memory, bool) or not isinstance(chunk_memory, int) or chunk_memory <= 0:
            raise OnnxSnnError(f"chunk_memory={chunk_memory!r} must be a positive number of bytes")
        self.chunk_memory = chunk_memory
        data = self._read(model)
        provider, explicit = prov.resolve(providers)
        probe = prov.session(data, "CPUExecutionProvider", optimize=False)
        meta = probe.get_modelmeta().custom_metadata_map
        self.spec = StepModelSpec.from_metadata(meta)
        state_inputs = {s.input for s in self.spec.states}
        self.inputs = [(i.name, list(i.shape), np_type(i.type)) for i in probe.get_inputs()
                       if i.name not in state_inputs]
        del probe
        form = RuntimeForm.from_json(meta[KEY_RUNTIME_FORM]) if runtime_form and KEY_RUNTIME_FORM in meta else None
        if form is not None:
            plan = Plan(form.prefix, form.body, form.boundary, form.states, list(self.spec.outputs), form.spike_counts)
        else:
            plan = Plan(None, data, [n for n, _, _ in self.inputs], self.spec.states, list(self.spec.outputs))
        self.layers = [s.input for s in self.spec.states if s.kind == MEMBRANE]
        chunk = form.chunk if form is not None else None
        if execution == "chunk" and chunk is None:
            raise OnnxSnnError("execution='chunk' needs the chunk model of the runtime form, which this step "
                               "model lacks" + (" (runtime_form=False)" if form is None and runtime_form else "")
                               + "; re-convert it with this onnx-snn, or use execution='step'")
        try:
            self._start(plan, chunk, provider, execution, kernels, cuda_graph=cuda_graph, threads=threads,
                        device_id=device_id, optimize=optimize)
        except prov.ProviderError as e:
            if explicit or provider == "CPUExecutionProvider":
                raise
            log.warning("falling back to the CPU provider: %s", e)  # auto mode: a GPU without working CUDA
            self._start(plan, chunk, "CPUExecutionProvider", execution, kernels, cuda_graph=cuda_graph,
                        threads=threads, device_id=device_id, optimize=optimize)
        self.provider = "CUDAExecutionProvider" if self._engine.device == "cuda" else "CPUExecutionProvider"
        self.firing_available = bool(plan.spike_counts)
        self._streaming: int | None = None
        self._feeder = Feeder(self.inputs, "simulator input")
        self._membrane_bytes_per_sample = sum(int(np.prod(s.shape[1:])) * np.dtype(s.dtype).itemsize
                                       for s in self.spec.states if s.kind == MEMBRANE)
        log.info("simulator on %s, %s execution, %s kernels, CUDA graphs %s, runtime form %s", self.provider,
                 self.execution, self.kernels, self.cuda_graph_status, "yes" if form else "no")

    def _start(self, plan: Plan, chunk: bytes | None, provider: str, execution: str, kernels: str, **options):
        """Pick kernels and execution (the rules README's "Speed" states) and start the engine."""
        cpu = provider == "CPUExecutionProvider"
        if kernels == "auto":
            # CUDA kernels (build_kernels_cuda.sh) are opt-in until they have run on a GPU (issue 14)
            kernels = "native" if cpu and native.available() else "onnx"
        if execution == "auto":
            # chunks measured faster on the CPU with either kernels (README, "Speed"); on CUDA
            # the step loop keeps its CUDA graphs, which refuse the function bodies' Scan
            execution = "chunk" if chunk is not None and cpu else "step"
        use_native = kernels == "native"
        if execution == "chunk":
            options.pop("cuda_graph")
            self._engine = ChunkEngine(plan, chunk, provider, native=use_native, **options)
        else:
            self._engine = Engine(plan, provider, native=use_native, **options)
        self.kernels, self.execution = kernels, execution

    @staticmethod
    def _read(model) -> bytes | str:
        """The model's bytes, or its path: onnxruntime resolves a large model's external data
        (``<name>.data``) relative to the file, which it cannot do for bytes."""
        if isinstance(model, (bytes, bytearray)):
            return bytes(model)
        path = Path(model)
        if not path.is_file():
            raise OnnxSnnError(f"step model {path} does not exist; convert a model with `onnx-snn convert`")
        return str(path)

    @property
    def cuda_graph(self) -> bool:
        return getattr(self._engine, "cuda_graph", False)

    @property
    def cuda_graph_status(self) -> str:
        return getattr(self._engine, "cuda_graph_reason", "off: chunk execution")

    def chunk_steps(self, batch: int, T: int) -> int:
        """K for a run of T steps on ``batch`` samples: the most steps whose activations fit
        ``chunk_memory`` (at least 1, at most T)."""
        per_step = max(1, batch) * self._membrane_bytes_per_sample * ACTIVATIONS_PER_NEURON
        return int(max(1, min(T, self.chunk_memory // max(per_step, 1))))

    def _named(self, x) -> dict:
        if isinstance(x, dict):
            return x
        if len(self.inputs) != 1:
            raise DataError(f"the model has inputs {[n for n, _, _ in self.inputs]}; pass a dict")
        return {self.inputs[0][0]: x}

    def _feeds(self, x) -> dict[str, np.ndarray]:
        # one Feeder per simulator: uint8 frames fed step by step are reported once, not per step
        return self._feeder(self._named(x))

    def _pad(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """With CUDA graphs, a smaller batch is padded to the captured size (extra rows ignored)."""
        n = len(next(iter(feeds.values())))
        size = self._engine.batch
        if self.cuda_graph and size is not None and n < size:
            feeds = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) for k, v in feeds.items()}
        return feeds, n

    # -- streaming -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the state: the next ``step`` starts a new sequence."""
        self._streaming = None

    def step(self, x, steps: int = 1) -> np.ndarray:
        """``steps`` timesteps (default 1) with input ``x``; returns the first output summed over
        the steps since ``reset``. With chunk execution the steps are one chunk, so calls with
        any ``steps`` continue one sequence, exactly as single steps would."""
        steps = check_T(steps)
        feeds, n = self._pad(self._feeds(x))
        batch = len(next(iter(feeds.values())))
        if self._streaming is None:
            self._engine.reset(batch)
            self._streaming = n
        elif n != self._streaming:
            raise DataError(f"batch of {n} samples while streaming {self._streaming}; call reset() first")
        self._engine.set_input(feeds)
        name = self.spec_outputs[0]
        if self.execution == "chunk":
            outputs, _ = self._engine.advance(steps, fetch_outputs=True)
            return outputs[name][-1][:n]
        for t in range(steps):
            outputs, _ = self._engine.advance(fetch_outputs=t == steps - 1)
        return outputs[name][:n]

    @property
    def spec_outputs(self) -> list[str]:
        return list(self.spec.outputs)

    # -- whole sequences -------------------------------------------------------------------------
    def run(self, x, T: int, *, per_step: bool = True, firing: bool = False):
        """Decoded first output after each of T steps, shape [T, N, ...] (``per_step=False``: [N, ...]).

        The input is constant: layers before the first neuron run once. With ``firing=True`` also
        returns {layer: spike counts [T, N]} (empty for a step model without a runtime form).
        On the CPU a large batch runs in slices of ``CPU_SLICE`` images, one after another: each
        image is simulated on its own, so the result is the same, and a slice's states stay in
        cache over the T steps (``bench/dense_limit.py`` measures it).
        """
        T = check_T(T)
        return self._run_prepared(self._feeds(x), T, per_step, firing)

    def _run_prepared(self, feeds: dict[str, np.ndarray], T: int, per_step: bool, firing: bool):
        """``run`` on feeds already through a ``Feeder``."""
        n = len(next(iter(feeds.values())))
        size = CPU_SLICE if self.provider == "CPUExecutionProvider" else n
        parts = [self._run_slice({k: v[s:s + size] for k, v in feeds.items()}, T, per_step, firing)
                 for s in range(0, max(n, 1), size)]  # one (empty) slice for n = 0
        result = np.concatenate([p[0] for p in parts], axis=1 if per_step else 0)
        if firing:
            return result, {k: np.concatenate([p[1][k] for p in parts], axis=1) for k in parts[0][1]}
        return result

    def _run_slice(self, feeds: dict[str, np.ndarray], T: int, per_step: bool, firing: bool):
        feeds, n = self._pad(feeds)
        self._streaming = None
        self._engine.reset(len(next(iter(feeds.values()))))
        self._engine.set_input(feeds)
        name = self.spec_outputs[0]
        if self.execution == "chunk":
            return self._run_chunks(n, T, per_step, firing)
        history, counts = [], {layer: [] for layer in self.layers} if firing else None
        for t in range(T):
            fetch = per_step or t == T - 1
            outputs, c = self._engine.advance(fetch_outputs=fetch, fetch_counts=firing and self.firing_available)
            if fetch:
                history.append(outputs[name][:n])
            if c:
                for layer, value in c.items():
                    counts[layer].append(value[:n])
        result = np.stack(history) if per_step else history[-1]
        return result, ({k: np.stack(v) for k, v in counts.items() if v} if firing else {})

    def _run_chunks(self, n: int, T: int, per_step: bool, firing: bool):
        name, k_max = self.spec_outputs[0], self.chunk_steps(n, T)
        history, counts, done = [], {layer: [] for layer in self.layers}, 0
        while done < T:
            k = min(k_max, T - done)
            done += k
            fetch = per_step or done == T
            outputs, c = self._engine.advance(k, fetch_outputs=fetch, fetch_counts=firing and self.firing_available)
            if fetch:
                history.append(outputs[name][:, :n] if per_step else outputs[name][-1][:n])
            for layer, value in (c or {}).items():
                counts[layer].append(value[:, :n])
        result = np.concatenate(history) if per_step else history[-1]
        return result, ({k: np.concatenate(v) for k, v in counts.items() if v} if firing else {})

    def evaluate(self, dataset, T: int, *, batch_size: int = 256, limit: int | None = None,
                 progress: bool = True) -> Evaluation:
        """Accuracy after every timestep over a labelled dataset (argmax of the summed first output),
        like SpikingJelly's ``val(net, T)``, and the mean firing rate of each neuron layer per step."""
        T = check_T(T)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise OnnxSnnError(f"batch_size={batch_size!r} must be a positive integer")
        batches, total = labelled_batches(dataset, batch_size, limit)
        correct = np.zeros(T)
        spikes = {layer: np.zeros(T) for layer in self.layers}
        neurons = {s.input: int(np.prod(s.shape[1:])) for s in self.spec.states if s.kind == MEMBRANE}
        feed = Feeder(self.inputs, "evaluation data")  # says once per dataset what it converted
        seen = 0
        bar = tqdm(total=total, desc=f"simulating T={T}", unit="img", disable=not progress, leave=False)
        for x, y in batches:
            out, counts = self._run_prepared(feed(self._named(x)), T, per_step=True, firing=True)
            correct += (out.reshape(T, len(y), -1).argmax(-1) == np.asarray(y)[None]).sum(axis=1)
            for layer, c in counts.items():
                spikes[layer] += c.sum(axis=1)
            seen += len(y)
            bar.update(len(y))
        bar.close()
        rates = {layer: spikes[layer] / (seen * neurons[layer]) for layer in spikes} if self.firing_available else {}
        return Evaluation(T, seen, correct / seen, rates)


def save_json(evaluation: Evaluation, path: str | os.PathLike, **extra) -> None:
    Path(path).write_text(json.dumps({**evaluation.to_json(), **extra}, indent=2))
