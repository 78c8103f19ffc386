"""Every script in examples/ runs from a fresh process and prints what it promises."""
import os
import subprocess
import sys

import pytest
from conftest import ROOT

EXAMPLES = {
    "convert_and_run.py": ["accuracy after t = 1, 16, 32"],
    "plot_figures.py": ["IF neuron: firing rate within", "wrote"],
    "export_triton.py": ["wrote", 'backend: "onnxruntime"'],
    "serve_and_call.py": ["whole inference over HTTP", "streaming over gRPC: after step 32"],
    "qcfs_finetune.py": ["quantized ANN", "SNN at T ="],
}


def test_every_example_is_covered():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script, tmp_path):
    args = [sys.executable, str(ROOT / "examples" / script), "--out", str(tmp_path)]
    if script == "serve_and_call.py":
        if not os.environ.get("CI"):
            pytest.importorskip("pytriton")
        from test_serve import free_ports
        http, grpc, metrics = free_ports(3)
        args += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for expected in EXAMPLES[script]:
        assert expected in result.stdout, result.stdout
    if script == "plot_figures.py":
        figures = ("if_neuron.png", "accuracy.png", "firing_rates.png")
        assert all((tmp_path / f).read_bytes()[:4] == b"\x89PNG" for f in figures)
