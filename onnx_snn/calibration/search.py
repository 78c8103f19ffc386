"""Threshold search: the scale lambda that minimises the rate-coding error for a target T.

An IF neuron with threshold lambda, initial potential ``v_init * lambda`` and a constant
input a per step fires ``n = min(T, floor(T * a / lambda + v_init))`` times in T steps, so the
SNN passes on ``q(a) = lambda * n / T`` where the ANN passes ``min(a, clip)``. A small lambda
clips large activations; a large one quantises coarsely. Following Li et al. (ICML 2021, "A free
lunch from ANN"), lambda minimises the expected squared error ``E[(a - q(a))^2]`` over the
calibration activations, evaluated on the streaming histogram (bin centres, counts) for
``candidates`` values of lambda evenly spaced in (0, max].

Cost: candidates x bins values per channel (0.5 M), for every channel of every layer (22 720
channels in a ResNet-50: about a minute of CPU). The error is computed in one preallocated
buffer per thread (the same operations in the same order as ``quantised``, so the same values;
2.7 ms of CPU a channel against 3.0 ms with fresh arrays at every step) and the channels are
shared among the CPU cores (threads: numpy releases the GIL inside each step).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .stats import StreamingHistogram

SEARCH_BINS = 2048  # the histogram is merged down to this many bins for the search
SEARCH_CHANNELS_PER_THREAD = 32  # fewer channels than this per core stay on one thread


def quantised(a: np.ndarray, lam: np.ndarray, T: int, v_init: float) -> np.ndarray:
    """What an IF neuron passes on after T steps for constant inputs ``a`` (broadcast against lam)."""
    spikes = np.clip(np.floor(a * T / lam + v_init), 0, T)
    return lam * spikes / T


def rate_coding_error(centres: np.ndarray, counts: np.ndarray, lams: np.ndarray, T: int, v_init: float,
                      out: np.ndarray | None = None) -> np.ndarray:
    """Expected squared error for each candidate lambda (``centres``/``counts``: one channel's bins):
    ``(counts * (a - quantised(a, lams, T, v_init)) ** 2).sum(axis=1)``, step by step in ``out``
    (float64, len(lams) x len(centres); a new array when None)."""
    return _error_terms(centres, counts, lams, T, v_init, out).sum(axis=1)


def _error_terms(centres, counts, lams, T, v_init, out=None) -> np.ndarray:
    """Each bin's term of ``rate_coding_error`` for each candidate, computed in ``out``."""
    a = centres[None, :]
    lam = lams[:, None]
    x = np.divide(a * T, lam, out=out)
    x += v_init
    np.floor(x, out=x)
    np.clip(x, 0, T, out=x)  # spikes
    np.multiply(lam, x, out=x)
    x /= T  # quantised(a)
    np.subtract(a, x, out=x)
    np.square(x, out=x)
    x *= counts[None, :]
    return x


def search_threshold(hist: StreamingHistogram, T: int, v_init: float = 0.0, candidates: int = 256) -> np.ndarray:
    """Per-channel lambda minimising the rate-coding error after T steps (0 for a dead channel)."""
    result = np.zeros(hist.channels)
    live = np.flatnonzero(hist.max > 0)
    bins = min(hist.counts.shape[1], SEARCH_BINS)

    def search(channels: np.ndarray) -> None:
        buffer = np.empty((candidates, bins))
        for c in channels:
            counts = hist.counts[c]
            if len(counts) > SEARCH_BINS:
                counts = counts.reshape(SEARCH_BINS, -1).sum(axis=1)
            width = hist.range[c] / len(counts)
            centres = np.minimum((np.arange(len(counts)) + 0.5) * width, hist.max[c])
            lams = hist.max[c] * np.arange(1, candidates + 1) / candidates
            error = rate_coding_error(centres, counts.astype(np.float64), lams, T, v_init, buffer)
            result[c] = lams[np.argmin(error)]

    workers = min(os.cpu_count() or 1, len(live) // SEARCH_CHANNELS_PER_THREAD)
    if workers <= 1:
        search(live)
    else:
        with ThreadPoolExecutor(workers) as pool:  # numpy releases the GIL inside each step
            list(pool.map(search, np.array_split(live, workers)))
    return result
