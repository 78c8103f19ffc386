"""The chunk engine: K timesteps per onnxruntime call through the runtime form's chunk model.

The prefix runs once per input; each ``advance(k)`` runs the chunk model once with
``snn.steps`` of length k and carries the states to the next call on the host (one copy per
chunk, not per step). It returns the decoded outputs after each of the k steps and, when asked,
the spike counts per layer, sample and step.
"""
from __future__ import annotations

import numpy as np

from . import providers as prov
from .engine import Plan
from .format import OUTPUT_SUM, STEPS_INPUT

# Batches up to this size run on one intra-op thread: their ops are too small to pay for waking a
# second one. Sample CNN, T = 50, 2-core machine, 1 against 2 threads (median ms per image over 6
# alternating runs): batch 1 1.86 / 2.03, batch 10 2.00 / 2.43 (batch 100: 2.33 / 2.68 there too,
# but more cores pay at large batches elsewhere, so large batches keep onnxruntime's choice).
SMALL_BATCH = 16


class ChunkEngine:
    def __init__(self, plan: Plan, chunk: bytes, provider: str, *, threads=None, device_id=0, optimize=True,
                 native=False):
        self.plan, self._chunk, self._provider, self.threads = plan, chunk, provider, threads
        opts = dict(threads=threads, device_id=device_id, optimize=optimize, native=native)
        self._options = opts
        # No spinning: the prefix runs once per batch and its idle threads must not spin beside
        # the chunk session's (providers.session); the chunk session's own spinning, between
        # calls that each run K steps, measured slower with 2 threads (sample CNN, 2-core
        # machine, T = 50: batch 1 3.7 against 1.9 ms per image, batch 100 2.8 against 2.3)
        # and makes no difference with 1.
        self.prefix = prov.session(plan.prefix, provider, spinning=False, **opts) if plan.prefix else None
        self.session = prov.session(chunk, provider, spinning=False, **opts)
        self._sessions = {threads: self.session}  # more are made on demand (_session_for)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        names = {o.name for o in self.session.get_outputs()}
        self._accumulators = {s.layer: s for s in plan.states if s.kind == OUTPUT_SUM}
        self._step_outputs = [f"{self._accumulators[o].input}.steps" for o in plan.outputs]
        self._counts = [(c.layer, f"{c.layer}.spike_count") for c in plan.spike_counts
                        if f"{c.layer}.spike_count" in names]
        self._state_outputs = [s.output for s in plan.states]
        self.batch: int | None = None
        self._boundary: dict[str, np.ndarray] = {}
        self._steps: dict[int, np.ndarray] = {}

    def reset(self, batch: int) -> None:
        """Start a new sequence of ``batch`` samples: states back to their initial values."""
        self.batch = batch
        self._states = {s.input: s.initial(batch) for s in self.plan.states}

    def set_input(self, feeds: dict[str, np.ndarray]) -> None:
        """Compute the boundary tensors (the prefix) from this input."""
        if self.prefix is not None:
            self._boundary = dict(zip(self.plan.boundary, self.prefix.run(self.plan.boundary, feeds)))
        else:
            self._boundary = {name: feeds[name] for name in self.plan.boundary}

    def advance(self, k: int, fetch_outputs: bool = True, fetch_counts: bool = False):
        """k timesteps. Returns ({output: [k, N, ...] decoded after each step}, {layer: [k, N]})."""
        steps = self._steps.get(k)
        if steps is None:
            steps = self._steps[k] = np.arange(k, dtype=np.int64)
        if self.batch == 0:
            return self._empty(k, fetch_outputs, fetch_counts)
        session = self._session_for(self.batch)
        names = self._state_outputs + (self._step_outputs if fetch_outputs else []) + (
            [name for _, name in self._counts] if fetch_counts else [])
        values = session.run(names, {**self._boundary, **self._states, STEPS_INPUT: steps})
        n_states = len(self._state_outputs)
        self._states = {s.input: v for s, v in zip(self.plan.states, values[:n_states])}
        rest = values[n_states:]
        outputs = counts = None
        if fetch_outputs:
            outputs = dict(zip(self.plan.outputs, rest[:len(self._step_outputs)]))
            rest = rest[len(self._step_outputs):]
        if fetch_counts:
            counts = {layer: value for (layer, _), value in zip(self._counts, rest)}
        return outputs, counts

    def _session_for(self, batch: int):
        """The chunk session for this batch size: one thread for small batches (SMALL_BATCH) on
        the CPU, else ``threads`` (the most the simulator may use; None: onnxruntime's choice)."""
        threads = 1 if self.device == "cpu" and batch <= SMALL_BATCH else self.threads
        if threads not in self._sessions:
            options = {**self._options, "threads": threads}
            self._sessions[threads] = prov.session(self._chunk, self._provider, spinning=False, **options)
        return self._sessions[threads]

    def _empty(self, k: int, fetch_outputs: bool, fetch_counts: bool):
        """An empty batch needs no onnxruntime call (and Scan, in the function bodies, refuses one)."""
        outputs = {o: np.zeros([k, 0] + list(self._accumulators[o].shape[1:]), self._accumulators[o].dtype)
                   for o in self.plan.outputs} if fetch_outputs else None
        dtypes = {s.input: s.dtype for s in self.plan.states}  # a count has its layer's type
        counts = {layer: np.zeros((k, 0), dtypes[layer]) for layer, _ in self._counts} if fetch_counts else None
        return outputs, counts
