"""Threshold search: the scale lambda that minimises the rate-coding error for a target T.

An IF neuron with threshold lambda, initial potential ``v_init * lambda`` and a constant
input a per step fires ``n = min(T, floor(T * a / lambda + v_init))`` times in T steps, so the
SNN passes on ``q(a) = lambda * n / T`` where the ANN passes ``min(a, clip)``. A small lambda
clips large activations; a large one quantises coarsely. Following Li et al. (ICML 2021, "A free
lunch from ANN"), lambda minimises the expected squared error ``E[(a - q(a))^2]`` over the
calibration activations, evaluated on the streaming histogram (bin centres, counts) for
``candidates`` values of lambda evenly spaced in (0, max].
"""
from __future__ import annotations

import numpy as np

from .stats import StreamingHistogram

SEARCH_BINS = 2048  # the histogram is merged down to this many bins for the search


def quantised(a: np.ndarray, lam: np.ndarray, T: int, v_init: float) -> np.ndarray:
    """What an IF neuron passes on after T steps for constant inputs ``a`` (broadcast against lam)."""
    spikes = np.clip(np.floor(a * T / lam + v_init), 0, T)
    return lam * spikes / T


def rate_coding_error(centres: np.ndarray, counts: np.ndarray, lams: np.ndarray, T: int, v_init: float) -> np.ndarray:
    """Expected squared error for each candidate lambda (``centres``/``counts``: one channel's bins)."""
    a = centres[None, :]
    return (counts[None, :] * (a - quantised(a, lams[:, None], T, v_init)) ** 2).sum(axis=1)


def search_threshold(hist: StreamingHistogram, T: int, v_init: float = 0.0, candidates: int = 256) -> np.ndarray:
    """Per-channel lambda minimising the rate-coding error after T steps (0 for a dead channel)."""
    result = np.zeros(hist.channels)
    for c in range(hist.channels):
        if hist.max[c] <= 0:
            continue
        counts = hist.counts[c]
        if len(counts) > SEARCH_BINS:
            counts = counts.reshape(SEARCH_BINS, -1).sum(axis=1)
        width = hist.range[c] / len(counts)
        centres = np.minimum((np.arange(len(counts)) + 0.5) * width, hist.max[c])
        lams = hist.max[c] * np.arange(1, candidates + 1) / candidates
        result[c] = lams[np.argmin(rate_coding_error(centres, counts.astype(np.float64), lams, T, v_init))]
    return result
