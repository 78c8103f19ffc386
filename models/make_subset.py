"""Write models/data/fashion_mnist_subset.npz from the full Fashion-MNIST (Debian package).

A class-balanced, seeded subset: 100 training images per class (calibration slice) and
200 test images per class (test slice), stored as uint8. Fashion-MNIST is (c) 2017
Zalando SE, MIT licence: see models/data/LICENSE.fashion-mnist.
"""
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "runtime"))
from onnx_snn_runtime.datasets import DEBIAN_DIR, read_idx_dir  # noqa: E402


def balanced(images, labels, per_class, rng):
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)])
    idx = rng.permutation(idx)
    return images[idx], labels[idx].astype(np.uint8)


def main():
    rng = np.random.default_rng(2026)
    x_calib, y_calib = balanced(*read_idx_dir(DEBIAN_DIR, "train"), 100, rng)
    x_test, y_test = balanced(*read_idx_dir(DEBIAN_DIR, "test"), 200, rng)
    out = HERE / "data" / "fashion_mnist_subset.npz"
    np.savez_compressed(out, x_calib=x_calib, y_calib=y_calib, x_test=x_test, y_test=y_test)
    print(f"wrote {out}: {len(x_calib)} calibration and {len(x_test)} test images")


if __name__ == "__main__":
    main()
