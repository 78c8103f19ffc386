"""User data into model inputs: the one reader the runtime and the converter share (numpy only).

Every batch, whatever its source, goes through ``prepare``: integer (and bool) data becomes
float in [0, 1] (uint8 / 255, other integers as they are cast), a missing channel axis is added
when the model's input shape leaves no doubt where (``x[:, None]`` for [N, 1, ...],
``x[..., None]`` for [N, ..., 1]), the shape is checked against the static dims and the values
must be finite. ``Feeder`` does this for a whole data source and says once, not per batch, what
it changed. Labelled datasets for ``Simulator.evaluate``: ``"fashion-mnist"`` (test split), an
``(x, y)`` pair, a dict with ``x``/``y`` (or ``images``/``labels``), an ``.npz`` path
(``file.npz:x_test`` names the array; labels ``y_test``, ``y`` or ``labels``), a folder of
MNIST-style IDX files (``t10k-*``), or an iterable of ``(x, y)`` batches such as a DataLoader.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import numpy as np

from .datasets import fashion_mnist, is_fashion_mnist, label_key, read_idx_dir, read_npz, split_npz_spec
from .errors import DataError

log = logging.getLogger(__name__)

# .npz arrays taken for evaluation when none is named: test images before the others
EVAL_KEYS = ("x", "images", "inputs", "x_test", "x_calib", "x_train")


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _static(d) -> bool:
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool)


def _fits(got: tuple, shape) -> bool:
    return len(got) == len(shape) and all(not _static(d) or d == s for d, s in zip(shape, got))


def _shown(shape) -> str:
    return "(" + ", ".join(str(d) if _static(d) else "N" if i == 0 else "?" for i, d in enumerate(shape)) + ")"


def _channel_axis(x: np.ndarray, shape) -> int | None:
    """Where to add the missing channel axis, or None. Adding a size-1 axis never moves data, so
    two positions giving the same shape are one answer; two different fitting shapes are a doubt."""
    if x.ndim != len(shape) - 1 or len(shape) < 2:
        return None
    fits = {}
    if _static(shape[1]) and shape[1] == 1:  # NCHW
        fits.setdefault(x.shape[:1] + (1,) + x.shape[1:], 1)
    if _static(shape[-1]) and shape[-1] == 1:  # NHWC (a Keras / tf2onnx export)
        fits.setdefault(x.shape + (1,), x.ndim)
    fits = {s: a for s, a in fits.items() if _fits(s, shape)}
    return next(iter(fits.values())) if len(fits) == 1 else None


def _why(got: tuple, shape) -> str:
    """What is wrong with a shape, in the user's terms."""
    rank = len(shape)
    if len(got) == rank - 1:
        if _fits((1,) + got, (1,) + tuple(shape[1:])):
            return "the batch axis is missing (one sample? pass x[None])"
        nchw = rank >= 3 and _fits(got[:1] + (shape[1] if _static(shape[1]) else 0,) + got[1:], shape)
        nhwc = rank >= 3 and _fits(got + (shape[-1] if _static(shape[-1]) else 0,), shape)
        if nchw and nhwc:
            return ("the channel axis is missing and the model's shape does not say where: add it "
                    "(x[:, None] for channels first, x[..., None] for channels last)")
        if nchw:
            return f"the channel axis (axis 1, {shape[1] if _static(shape[1]) else '?'} channels) is missing"
        if nhwc:
            return f"the channel axis (last, {shape[-1] if _static(shape[-1]) else '?'} channels) is missing"
    if len(got) == rank - 2 and rank >= 3:
        if _fits((1, 1) + got, shape):
            return "the batch and channel axes are missing (one image? pass x[None, None])"
        if _fits((1,) + got + (1,), shape):
            return "the batch and channel axes are missing (one image? pass x[None, ..., None])"
    if len(got) != rank:
        return f"{len(got)} axes where the model has {rank} (batch first)"
    if rank == 4 and _fits(got[:1] + got[3:] + got[1:3], shape):
        return "the data is channels last and the model channels first: x.transpose(0, 3, 1, 2)"
    if rank == 4 and _fits(got[:1] + got[2:] + got[1:2], shape):
        return "the data is channels first and the model channels last: x.transpose(0, 2, 3, 1)"
    wrong = [f"axis {i} is {s}, not {d}" for i, (d, s) in enumerate(zip(shape, got)) if _static(d) and d != s]
    return "; ".join(wrong)


def scale_integers(x: np.ndarray, name: str = "input") -> tuple[np.ndarray, str | None]:
    """Integer or bool data as float32: uint8 / 255 (8-bit images; the models here are trained on
    [0, 1]), other integers as they are cast. Returns the words saying so, None for float data."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0), f"input {name!r} is uint8: divided by 255 to [0, 1]"
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        return x.astype(np.float32), f"input {name!r} is {x.dtype}: cast to float as is (only uint8 is divided by 255)"
    return x, None


def convert(x: Any, shape, dtype, name: str = "input", where: str = "") -> tuple[np.ndarray, dict[str, str]]:
    """``prepare`` and what it changed: {kind: words} (kinds ``scaled``, ``channel``)."""
    x, dtype, notes = to_numpy(x), np.dtype(dtype), {}
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{where}input {name!r} has dtype {x.dtype}; give numbers "
                        "(float in the model's input range, or integer images)")
    if np.issubdtype(dtype, np.floating):  # an integer model input takes integers as they are
        x, words = scale_integers(x, name)
        if words:
            notes["scaled"] = words
    axis = _channel_axis(x, shape)
    if axis is not None:
        notes["channel"] = f"input {name!r} has no channel axis: added as axis {axis} ({x.shape[1:]} per sample)"
        x = np.expand_dims(x, axis)
    if not _fits(x.shape, shape):
        raise DataError(f"{where}input {name!r} has shape {x.shape} but the model expects {_shown(shape)}: "
                        f"{_why(x.shape, shape)}")
    x = np.ascontiguousarray(x, dtype=dtype)
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataError(f"{where}input {name!r} contains NaN or Inf; clean the data")
    return x, notes


def prepare(x: Any, shape: list, dtype: np.dtype, name: str = "input") -> np.ndarray:
    """One batch for a model input: scaled, channel axis added if missing, checked and cast.
    Says what it changed at DEBUG only: a caller feeding many batches uses ``Feeder``."""
    x, notes = convert(x, shape, dtype, name)
    for words in notes.values():
        log.debug("%s", words)
    return x


class Feeder:
    """``prepare`` for every input of every batch of one data source; says each change once (INFO)."""

    def __init__(self, inputs: list[tuple[str, Any, Any]], what: str = "data"):
        self.inputs, self.what, self.said = inputs, what, set()

    def __call__(self, feeds: dict[str, Any], where: str = "") -> dict[str, np.ndarray]:
        missing = [n for n, _, _ in self.inputs if n not in feeds]
        if missing:
            raise DataError(f"{where}no data for model input(s) {missing} (got {sorted(feeds)})")
        out = {}
        for name, shape, dtype in self.inputs:
            out[name], notes = convert(feeds[name], shape, dtype, name, where)
            for kind, words in notes.items():
                if (name, kind) not in self.said:
                    self.said.add((name, kind))
                    log.info("%s: %s", self.what, words)
        return out


def how_many(taken: int, total: int | None, unit: str = "samples") -> str:
    if total is None:
        return f"{taken} {unit}"
    return f"all {total} {unit}" if taken >= total else f"first {taken} of {total} {unit}"


def _pair(data: Any) -> tuple[tuple[np.ndarray, np.ndarray], str, str] | None:
    """((x, y), where from, unit) for every form given whole; None for an iterable of batches."""
    if is_fashion_mnist(data):
        x, y, origin = fashion_mnist("test")
        return (x, y), f"Fashion-MNIST test split, {origin}", "images"
    if isinstance(data, (str, os.PathLike)):
        path, _ = split_npz_spec(data)
        if path.is_dir():
            pair = read_idx_dir(path, "test")
            if pair is None:
                raise DataError(f"{path} holds no t10k-images-idx3-ubyte / t10k-labels-idx1-ubyte files")
            return pair, f"IDX files t10k-* in {path}", "images"
        if not path.is_file():
            raise DataError(f"dataset {path} does not exist; give an .npz (file.npz or file.npz:x_test), "
                            "an IDX folder or 'fashion-mnist'")
        x, y, name, names = read_npz(data, EVAL_KEYS, labels=True)
        return (x, y), f"{path}, arrays {name!r} and {label_key(name, names)!r}", "samples"
    if isinstance(data, dict):
        xk = next((k for k in ("x", "images", "x_test") if k in data), None)
        yk = next((k for k in ("y", "labels", "y_test") if k in data), None)
        if xk is None or yk is None:
            raise DataError(f"dataset dict/npz needs arrays 'x' and 'y' (got {sorted(data)})")
        return (to_numpy(data[xk]), to_numpy(data[yk])), f"a dict, arrays {xk!r} and {yk!r}", "samples"
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple):
        x, y = to_numpy(data[0]), to_numpy(data[1])
        if x.ndim >= 2:
            return (x, y), "an (x, y) pair of arrays", "samples"
    return None


def _resolve(data: Any, limit: int | None) -> tuple[tuple | None, Any, str]:
    """(the (x, y) pair cut to ``limit`` or None, the iterable of batches otherwise, description)."""
    found = _pair(data)
    if found is None:
        if not hasattr(data, "__iter__") or isinstance(data, (str, bytes)):
            raise DataError(f"cannot use {type(data).__name__} as a dataset; give 'fashion-mnist', an (x, y) "
                            "pair, an .npz, an IDX folder or an iterable of (x, y) batches")
        what = f"evaluation data: an iterable of (x, y) batches ({type(data).__name__})"
        if hasattr(data, "dataset"):  # a torch DataLoader knows its size
            total = len(data.dataset)
            what += f": {how_many(min(total, limit or total), total)}"
        return None, data, what
    (x, y), origin, unit = found
    if len(x) != len(y) or y.ndim != 1:
        raise DataError(f"{len(x)} samples but labels of shape {y.shape}; give one class index per sample")
    taken = min(len(x), limit) if limit else len(x)
    return (x[:taken], y[:taken]), None, f"evaluation data: {origin}: {how_many(taken, len(x), unit)}"


def labelled_source(data: Any, limit: int | None = None) -> tuple[Any, str]:
    """(the data as an (x, y) pair cut to ``limit``, or the iterable as given; one line saying which
    source it is and how many samples), for a CLI to print before ``evaluate``. Reads files once."""
    pair, iterable, description = _resolve(data, limit)
    return (pair if pair is not None else iterable), description


def labelled_batches(data: Any, batch_size: int, limit: int | None = None) -> tuple[Iterator, int | None]:
    """(iterator of (x, labels) batches, number of samples if known). Logs the source once (INFO)."""
    pair, source, description = _resolve(data, limit)
    log.info("%s", description)
    if pair is not None:
        x, y = pair
        if len(x) == 0:
            raise DataError("the dataset is empty")
        return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)), len(x)

    def generate():
        seen = 0
        for item in source:
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
    total = min(len(source.dataset), limit or 10**18) if hasattr(source, "dataset") else None
    return generate(), total
