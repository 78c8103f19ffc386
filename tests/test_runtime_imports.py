"""The runtime package is what deployments install: numpy and onnxruntime only."""
import subprocess
import sys


def test_runtime_imports_neither_torch_nor_onnx_nor_the_converter():
    code = ("import sys, onnx_snn_runtime.format, onnx_snn_runtime.loop, onnx_snn_runtime.datasets; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnx_snn', "
            "'onnx_graphsurgeon')); print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
