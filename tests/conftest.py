import logging
import os
from pathlib import Path

import pytest
from onnx_snn_runtime.datasets import load_fashion_mnist

# every conversion in the tests checks each pass's guarantee on its result (PassManager, passes.base)
os.environ.setdefault("ONNX_SNN_CHECK_PASSES", "1")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ONNX = ROOT / "models" / "sample_cnn.onnx"


@pytest.fixture(scope="session")
def bundled():
    xc, yc = load_fashion_mnist("train", source="bundled")
    xt, yt = load_fashion_mnist("test", source="bundled")
    return xc, yc, xt, yt


@pytest.fixture(scope="session")
def sample_snn(bundled, tmp_path_factory):
    """Path of the sample CNN converted with 99.9% on the bundled calibration slice."""
    import onnx_snn
    path = tmp_path_factory.mktemp("sample") / "cnn.snn.onnx"
    onnx_snn.save(onnx_snn.Converter(bundled[0], mode="99.9%", progress=False)(SAMPLE_ONNX), path)
    return path


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)


@pytest.fixture(scope="session")
def native_kernels():
    """The native kernel library's path. Missing, the test is skipped, except where
    ``ONNX_SNN_REQUIRE_KERNELS`` is set (CI builds the library, so there it must be present)."""
    from onnx_snn_runtime import native
    if not native.available():
        message = f"native kernels not built ({native.BUILD_HINT})"
        if os.environ.get("ONNX_SNN_REQUIRE_KERNELS"):
            pytest.fail(message + "; ONNX_SNN_REQUIRE_KERNELS is set")
        pytest.skip(message)
    return native.library()
