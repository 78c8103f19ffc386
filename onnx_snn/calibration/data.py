"""Calibration data: what users pass, as batches of model inputs.

Accepted: a numpy array (batched here), a path to an ``.npz`` (``file.npz:name`` names the array;
else ``x``, ``images``, ``inputs``, ``x_calib``, ``x_train``, ``x_test``, else the first), a dict
``{input name: array}``, or any iterable (a torch DataLoader among them) of arrays, tensors,
``(x, label, ...)`` tuples or dicts. Each batch goes through the runtime's reader
(``onnx_snn_runtime.data``), so calibration sees exactly what the simulator will: integer images
scaled to [0, 1], a missing channel axis added, shapes, dtypes and finiteness checked.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper
from onnx_snn_runtime.data import Feeder, how_many, scale_integers, to_numpy
from onnx_snn_runtime.datasets import fashion_mnist, is_fashion_mnist, read_npz, split_npz_spec

from ..errors import DataError

__all__ = ["InputSpec", "iterate_batches", "take_samples", "first_input", "load_npz", "to_numpy", "calibration_source",
           "FASHION_MNIST_IMAGES"]

log = logging.getLogger(__name__)

# Images ``--calib fashion-mnist`` takes by default: the demo's choice (``--calib-samples``), so
# `onnx-snn convert --calib fashion-mnist` calibrates as `onnx-snn demo` does.
FASHION_MNIST_IMAGES = 10_000


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


def load_npz(path: str | os.PathLike) -> np.ndarray:
    """The calibration array of ``file.npz`` or ``file.npz:name``; logs which array it took."""
    x, _, name, names = read_npz(path)
    log.info("calibration data: array %r of %s (arrays: %s)", name, path, ", ".join(names))
    return x


def calibration_source(spec: str, limit: int | None) -> tuple[Any, str]:
    """(data for ``Converter``, one line saying which source and how many images) for ``--calib``:
    ``fashion-mnist`` (training split, first ``FASHION_MNIST_IMAGES`` unless ``limit``) or an .npz."""
    if is_fashion_mnist(spec):
        x, _, origin = fashion_mnist("train")
        taken = min(limit or FASHION_MNIST_IMAGES, len(x))
        description = f"calibration data: Fashion-MNIST training split, {origin}: {how_many(taken, len(x), 'images')}"
        x = x[:taken]
    else:
        path, _ = split_npz_spec(spec)
        if not path.is_file():
            raise DataError(f"calibration file {path} does not exist; give an .npz (file.npz or "
                            "file.npz:ARRAY) or 'fashion-mnist'")
        x, _, name, _ = read_npz(spec)
        taken = min(limit, len(x)) if limit else len(x)
        description = (f"calibration data: {path}, array {name!r} ({x.dtype}, {x.shape[1:]} per sample): "
                       f"{how_many(taken, len(x))}")
        x = x[:taken]
    log.info("%s", description)
    return x, description


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


def named_arrays(data: Any, inputs: list[InputSpec]) -> Any:
    """An .npz path, an array or a tensor as ``{first input: array}``; other data as it is."""
    if isinstance(data, (str, os.PathLike)):
        data = load_npz(data)
    if isinstance(data, np.ndarray) or hasattr(data, "detach"):
        data = {inputs[0].name: to_numpy(data)}
    return data


def iterate_batches(data: Any, inputs: list[InputSpec], batch_size: int = 256) -> tuple[Iterator[dict], int | None]:
    """(iterator over prepared feed dicts, number of batches if known)."""
    if data is None:
        raise DataError("no calibration data given; pass dataloader= (an array, .npz path or iterable of batches)")
    data = named_arrays(data, inputs)
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
    feed = Feeder([(s.name, s.shape, s.dtype) for s in inputs], "calibration data")

    def generate() -> Iterator[dict]:
        seen = 0
        for i, item in enumerate(source):
            feeds = feed(_feeds(item, inputs), f"calibration batch {i}: ")
            if len(next(iter(feeds.values()))) == 0:
                continue
            seen += 1
            yield feeds
        if seen == 0:
            raise DataError("calibration data is empty; give at least one sample")

    return generate(), count


def take_samples(data, model: onnx.ModelProto, states, samples: int, batch_size: int) -> dict[str, np.ndarray]:
    """The first ``samples`` calibration samples (fewer if the data has fewer) as one feed dict
    for ``model``'s data inputs (not its initializers or state inputs)."""
    skip = {t.name for t in model.graph.initializer} | {s.input for s in states}
    specs = [InputSpec.of(i) for i in model.graph.input if i.name not in skip]
    batches, _ = iterate_batches(data, specs, batch_size)
    taken: dict[str, list] = {s.name: [] for s in specs}
    count = 0
    for feeds in batches:
        for k, v in feeds.items():
            taken[k].append(v)
        count += len(next(iter(feeds.values())))
        if count >= samples:
            break
    return {k: np.concatenate(v)[:samples] for k, v in taken.items()}


def first_input(data: Any) -> np.ndarray:
    """One sample (batch axis kept) of the data's first input, to trace a torch export with.
    Integer images are scaled as calibration will scale them: the export traces in float."""
    if isinstance(data, (str, os.PathLike)):
        data = load_npz(data)
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
    return scale_integers(sample)[0]
