"""Labelled datasets for evaluation, batched and shaped for a model input (numpy only).

Accepted: ``"fashion-mnist"`` (full set if installed, else the bundled slice), an ``(x, y)``
pair of arrays, a dict with ``x``/``y`` (or ``images``/``labels``), an ``.npz`` path with those
keys, a folder of MNIST-style IDX files (the test split: ``t10k-*``), or an iterable of
``(x, y)`` batches such as a torch DataLoader. Integer images are scaled to [0, 1]; a missing
channel axis is added when the model expects one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .datasets import load_fashion_mnist, read_idx_dir
from .errors import DataError


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def prepare(x: Any, shape: list, dtype: np.dtype, name: str = "input") -> np.ndarray:
    """Check one batch against the model input (rank, static dims), scale integer images, cast floats."""
    x = to_numpy(x)
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"input {name!r} has dtype {x.dtype}; give floating-point data (float32)")
    if x.ndim == len(shape) - 1 and shape[1] == 1:
        x = x[:, None]
    if x.ndim != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(shape, x.shape)):
        shown = tuple(d if isinstance(d, int) else "N" if i == 0 else "?" for i, d in enumerate(shape))
        raise DataError(f"input {name!r} has shape {x.shape} but the model expects {shown}; "
                        "give a batch with the batch axis first")
    return np.ascontiguousarray(x, dtype=dtype)


def _pair_from(data: Any) -> tuple[np.ndarray, np.ndarray] | None:
    if isinstance(data, str) and data.lower() in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return load_fashion_mnist("test")
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            pair = read_idx_dir(path, "test")
            if pair is None:
                raise DataError(f"{path} holds no t10k-images-idx3-ubyte / t10k-labels-idx1-ubyte files")
            return pair
        if not path.is_file():
            raise DataError(f"dataset {path} does not exist; give an .npz, an IDX folder or 'fashion-mnist'")
        try:
            with np.load(path) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
    if isinstance(data, dict):
        x = next((data[k] for k in ("x", "images", "x_test") if k in data), None)
        y = next((data[k] for k in ("y", "labels", "y_test") if k in data), None)
        if x is None or y is None:
            raise DataError(f"dataset dict/npz needs arrays 'x' and 'y' (got {sorted(data)})")
        return to_numpy(x), to_numpy(y)
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple):
        x, y = to_numpy(data[0]), to_numpy(data[1])
        if x.ndim >= 2:
            return x, y
    return None


def labelled_batches(data: Any, batch_size: int, limit: int | None = None) -> tuple[Iterator, int | None]:
    """(iterator of (x, labels) batches, number of samples if known)."""
    pair = _pair_from(data)
    if pair is not None:
        x, y = pair
        if len(x) != len(y) or y.ndim != 1:
            raise DataError(f"{len(x)} samples but labels of shape {y.shape}; give one class index per sample")
        if limit:
            x, y = x[:limit], y[:limit]
        if len(x) == 0:
            raise DataError("the dataset is empty")
        return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)), len(x)
    if hasattr(data, "__iter__") and not isinstance(data, (str, bytes)):
        def generate():
            seen = 0
            for item in data:
                if not isinstance(item, (tuple, list)) or len(item) < 2:
                    raise DataError("each batch of an iterable dataset must be (inputs, labels)")
                x, y = to_numpy(item[0]), to_numpy(item[1])
                if len(x) != len(y) or y.ndim != 1:
                    raise DataError(f"a batch has {len(x)} inputs but labels of shape {y.shape}; give one "
                                    "class index per sample")
                if limit and seen + len(x) > limit:
                    x, y = x[: limit - seen], y[: limit - seen]
                if len(x):
                    yield x, y
                seen += len(x)
                if limit and seen >= limit:
                    return
            if seen == 0:
                raise DataError("the dataset is empty")
        return generate(), (min(len(data.dataset), limit or 10**18) if hasattr(data, "dataset") else None)
    raise DataError(f"cannot use {type(data).__name__} as a dataset; give 'fashion-mnist', an (x, y) pair, "
                    "an .npz, an IDX folder or an iterable of (x, y) batches")
