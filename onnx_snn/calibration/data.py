"""Turn what users pass as calibration data into validated batches of model inputs.

Accepted: a numpy array (batched here), a path to an ``.npz`` (key ``x``, else ``images``, else
its first array), a dict ``{input name: array}``, or any iterable (a torch DataLoader among
them) of arrays, tensors, ``(x, label, ...)`` tuples or dicts. Every batch is checked against
the model's inputs (rank, static dims, finite numbers) and cast to their dtype.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from onnx_snn_runtime.data import to_numpy

from ..errors import DataError


@dataclass
class InputSpec:
    name: str
    shape: tuple  # ints for static dims, None for dynamic ones
    dtype: np.dtype

    @classmethod
    def of(cls, value_info: onnx.ValueInfoProto) -> "InputSpec":
        t = value_info.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        return cls(value_info.name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)))


def load_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path) as z:
            if not z.files:
                raise DataError(f"{path} holds no arrays")
            key = next((k for k in ("x", "images", "inputs") if k in z.files), z.files[0])
            return z[key]
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read calibration file {path}: {e}; give an .npz with an array 'x'") from e


def _batches_of(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in arrays.items()}


def _feeds(item: Any, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    if isinstance(item, dict):
        return {k: to_numpy(v) for k, v in item.items()}
    if isinstance(item, (tuple, list)) and not (len(inputs) > 1 and len(item) == len(inputs)):
        item = item[0]  # (x, label, ...)
    if isinstance(item, (tuple, list)):
        return {spec.name: to_numpy(v) for spec, v in zip(inputs, item)}
    return {inputs[0].name: to_numpy(item)}


def validate(feeds: dict[str, np.ndarray], inputs: list[InputSpec], where: str) -> dict[str, np.ndarray]:
    out = {}
    for spec in inputs:
        if spec.name not in feeds:
            raise DataError(f"{where}: no data for model input {spec.name!r} (got {sorted(feeds)})")
        x = feeds[spec.name]
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise DataError(f"{where}: input {spec.name!r} has dtype {x.dtype}; give numbers")
        if x.ndim != len(spec.shape) or any(d is not None and d != s for d, s in zip(spec.shape, x.shape)):
            shown = tuple("?" if d is None else d for d in spec.shape)
            raise DataError(f"{where}: input {spec.name!r} has shape {x.shape} but the model expects "
                            f"{shown}; reshape the data (batch first)")
        x = x.astype(spec.dtype, copy=False)
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise DataError(f"{where}: input {spec.name!r} contains NaN or Inf; clean the data")
        out[spec.name] = x
    return out


def iterate_batches(data: Any, inputs: list[InputSpec], batch_size: int = 256) -> tuple[Iterator[dict], int | None]:
    """(iterator over validated feed dicts, number of batches if known)."""
    if data is None:
        raise DataError("no calibration data given; pass dataloader= (an array, .npz path or iterable of batches)")
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise DataError(f"calibration file {path} does not exist")
        data = load_npz(path)
    if isinstance(data, np.ndarray) or hasattr(data, "detach"):
        data = {inputs[0].name: to_numpy(data)}
    if isinstance(data, dict):
        arrays = {k: to_numpy(v) for k, v in data.items()}
        n = {len(v) if v.ndim else 0 for v in arrays.values()}
        if n == {0} or not arrays:
            raise DataError("calibration data is empty; give at least one sample")
        if len(n) != 1:
            raise DataError(f"calibration arrays have different lengths {sorted(n)}")
        count = -(-n.pop() // batch_size)
        source: Iterable = _batches_of(arrays, batch_size)
    elif isinstance(data, Iterable):
        source, count = data, (len(data) if hasattr(data, "__len__") else None)
    else:
        raise DataError(f"cannot use {type(data).__name__} as calibration data; give an array, "
                        "an .npz path, a dict of arrays or an iterable of batches")

    def generate() -> Iterator[dict]:
        seen = 0
        for i, item in enumerate(source):
            feeds = validate(_feeds(item, inputs), inputs, f"calibration batch {i}")
            if len(next(iter(feeds.values()))) == 0:
                continue
            seen += 1
            yield feeds
        if seen == 0:
            raise DataError("calibration data is empty; give at least one sample")

    return generate(), count


def first_input(data: Any) -> np.ndarray:
    """One sample (batch axis kept) of the data's first input, to trace a torch export with."""
    if isinstance(data, (str, os.PathLike)):
        data = load_npz(Path(data))
    if isinstance(data, np.ndarray) or hasattr(data, "detach"):
        sample = to_numpy(data)[:1]
    elif isinstance(data, dict):
        sample = to_numpy(next(iter(data.values())))[:1]
    else:
        item = next(iter(data), None)
        if isinstance(item, dict):
            item = next(iter(item.values()))
        elif isinstance(item, (tuple, list)):
            item = item[0]
        sample = None if item is None else to_numpy(item)[:1]
    if sample is None or len(sample) == 0:
        raise DataError("calibration data is empty; give at least one sample")
    return sample
