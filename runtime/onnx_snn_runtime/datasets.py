"""Fashion-MNIST from IDX files, or from the small subset the repository bundles.

numpy only: the runtime must load data without torch. Where the Debian package
``dataset-fashion-mnist`` is installed, the full set is read from its IDX files;
elsewhere a bundled subset (``models/data/fashion_mnist_subset.npz``, MIT licence,
Zalando SE) serves, so the project runs on any machine. Also reads user ``.npz`` files, whose
array may be named after a colon (``file.npz:x_calib``).
"""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCE_ENV = "ONNX_SNN_FASHION_MNIST"  # auto (default), full or bundled: what source="auto" means
BUNDLED = Path(__file__).resolve().parents[2] / "models" / "data" / "fashion_mnist_subset.npz"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLIT_FILES = {"train": "train", "test": "t10k"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says shape {dims} but holds {data.size} values (truncated file?)")
    return data.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx_dir(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, labels) of one split from a folder of MNIST-style IDX files, or None if absent."""
    prefix = _SPLIT_FILES[split]
    directory = Path(directory)
    images = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    return read_idx(images), read_idx(labels)


FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fmnist")


def is_fashion_mnist(spec) -> bool:
    return isinstance(spec, str) and spec.lower() in FASHION_MNIST_NAMES


def load_fashion_mnist(split: str = "test", source: str = "auto",
                       root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 in [0, 1], shape [N, 1, 28, 28], and int64 labels.

    ``source``: ``"full"`` (IDX files in ``root`` or the Debian package's folder),
    ``"bundled"`` (the repository's subset: 1000 training and 2000 test images),
    or ``"auto"`` (full when present, else bundled, with a log message).
    """
    images, labels, _ = fashion_mnist(split, source, root)
    return images, labels


def fashion_mnist(split: str = "test", source: str = "auto",
                  root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """``load_fashion_mnist`` and where the images came from, in words (for the user to see).
    ``source="auto"`` follows ``$ONNX_SNN_FASHION_MNIST`` (auto, full or bundled) when it is set:
    the docs' test sets it to bundled, so that it runs the same on every machine."""
    if source == "auto":
        source = os.environ.get(SOURCE_ENV, "auto") or "auto"
        if source not in ("auto", "full", "bundled"):
            raise DataError(f"{SOURCE_ENV}={source!r}; use 'auto', 'full' or 'bundled'")
    if split not in _SPLIT_FILES:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    if source not in ("auto", "full", "bundled"):
        raise DataError(f"unknown source {source!r}; use 'auto', 'full' or 'bundled'")
    pair = None
    if source in ("auto", "full"):
        directory = Path(root) if root is not None else DEBIAN_DIR
        pair = read_idx_dir(directory, split)
        origin = (f"full set from the Debian package ({directory})" if root is None
                  else f"full set from {directory}")
        if pair is None and source == "full":
            raise DataError(f"no Fashion-MNIST IDX files for split {split!r} in {directory}; "
                            "install the Debian package dataset-fashion-mnist or pass root=")
    if pair is None:
        if source == "auto":
            log.info("full Fashion-MNIST not found; using the bundled subset (%s)", BUNDLED)
        pair = _load_bundled(split)
        origin = f"bundled subset ({BUNDLED}; install dataset-fashion-mnist for the full set)"
    images, labels = pair
    return (images.astype(np.float32)[:, None] / 255.0), labels.astype(np.int64), origin


def _load_bundled(split: str) -> tuple[np.ndarray, np.ndarray]:
    if not BUNDLED.is_file():
        raise DataError(f"bundled Fashion-MNIST subset missing at {BUNDLED}; "
                        "reinstall from a checkout or install dataset-fashion-mnist")
    with np.load(BUNDLED) as z:
        key = "calib" if split == "train" else "test"
        return z[f"x_{key}"], z[f"y_{key}"]


# Without a name after the colon, the first of these an .npz holds is taken (then its first array).
INPUT_KEYS = ("x", "images", "inputs", "x_calib", "x_train", "x_test")
LABEL_KEYS = ("y", "labels")


def split_npz_spec(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """``file.npz:name`` -> (path, name); a path that exists as given is never split."""
    text = os.fspath(spec)
    head, sep, name = text.rpartition(":")
    if sep and head and name and not Path(text).exists() and not any(c in name for c in "/\\"):
        return Path(head), name
    return Path(text), None


def _label_keys(name: str) -> tuple[str, ...]:
    return (("y_" + name[2:],) if name.startswith("x_") else ()) + LABEL_KEYS


def label_key(name: str, names: list[str]) -> str | None:
    """The labels of array ``name``: ``y_<suffix>`` for ``x_<suffix>``, else ``y``, else ``labels``."""
    return next((k for k in _label_keys(name) if k in names and k != name), None)


def read_npz(spec: str | os.PathLike, keys: tuple[str, ...] = INPUT_KEYS,
             labels: bool = False) -> tuple[np.ndarray, np.ndarray | None, str, list[str]]:
    """(array, its labels if asked, the array's name, all names) from ``file.npz[:name]``.

    Labels as ``label_key`` finds them; an absent name is a DataError listing the arrays.
    """
    path, name = split_npz_spec(spec)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; give an .npz (optionally file.npz:ARRAY)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}; give an .npz (numpy.savez) with an array 'x'") from e
    if isinstance(loaded, np.ndarray):  # a .npy file: one unnamed array
        loaded = {"arr_0": loaded}
    try:
        names = list(loaded.keys())
        if not names:
            raise DataError(f"{path} holds no arrays")
        if name is None:
            name = next((k for k in keys if k in names), names[0])
        if name not in names:
            raise DataError(f"{path} has no array {name!r}; its arrays: {', '.join(names)} "
                            f"(name one as {path}:NAME)")
        y = None
        if labels:
            key = label_key(name, names)
            if key is None:
                raise DataError(f"{path}: no labels for array {name!r} (looked for "
                                f"{', '.join(_label_keys(name))}; its arrays: {', '.join(names)})")
            y = loaded[key]
        return loaded[name], y, name, names
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as e:  # a damaged member is read only here
        raise DataError(f"cannot read {path}: {e}") from e
    finally:
        if hasattr(loaded, "close"):
            loaded.close()
