"""The plainest correct simulation of a step model: feed the input at every timestep, carry the
states from each step's outputs to the next step's inputs, and decode the outputs (sum over t)."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnxruntime as ort

from .errors import OnnxSnnError
from .format import StepModelSpec


def spec_of(session: ort.InferenceSession) -> StepModelSpec:
    return StepModelSpec.from_metadata(session.get_modelmeta().custom_metadata_map)


def check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T <= 0:
        raise OnnxSnnError(f"T={T!r}: the number of timesteps must be a positive integer")
    return int(T)


def simulate(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], T: int,
             spec: StepModelSpec | None = None, *, per_step: bool = True) -> dict[str, np.ndarray]:
    """Decoded outputs ``{output name: array}``: after every timestep ([T, N, ...]), or with
    ``per_step=False`` only after the last ([N, ...], no history kept)."""
    T = check_T(T)
    spec = spec or spec_of(session)
    batch = len(next(iter(feeds.values())))
    states = {s.input: s.initial(batch) for s in spec.states}
    names = list(spec.outputs) + [s.output for s in spec.states]
    totals = None
    history = {name: [] for name in spec.outputs}
    for _ in range(T):
        values = session.run(names, {**feeds, **states})
        step = dict(zip(names, values))
        states = {s.input: step[s.output] for s in spec.states}
        totals = {k: step[k] if totals is None else totals[k] + step[k] for k in spec.outputs}
        if per_step:
            for k in spec.outputs:
                history[k].append(totals[k])
    return {k: np.stack(v) for k, v in history.items()} if per_step else totals
