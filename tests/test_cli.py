"""The onnx-snn command line, as a user runs it."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_ONNX

import onnx_snn
from onnx_snn.cli import main


@pytest.fixture
def calib_npz(tmp_path, bundled):
    path = tmp_path / "calib.npz"
    np.savez(path, x=bundled[0][:300])
    return path


def test_convert_prints_the_table_and_writes_a_step_model(calib_npz, tmp_path, capsys):
    out = tmp_path / "cnn.snn.onnx"
    assert main(["convert", str(SAMPLE_ONNX), "--calib", str(calib_npz), "--mode", "99.9%", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lambda" in printed and "above lambda" in printed and "/2/Relu" in printed
    assert "3 neuron layers" in printed
    spec = onnx_snn.spec(onnx_snn.load(out))
    assert spec.calibration["mode"] == "99.9%" and spec.calibration["samples"] == 300
    shares = [float(line.split()[-1].rstrip("%")) for line in printed.splitlines() if "/Relu" in line]
    assert all(0.05 <= s <= 0.2 for s in shares), shares  # ~0.1 % above the 99.9th percentile


def test_convert_fashion_mnist_keyword_and_per_channel(tmp_path, capsys):
    out = tmp_path / "pc.snn.onnx"
    assert main(["convert", str(SAMPLE_ONNX), "--calib", "fashion-mnist", "--limit", "200", "--mode", "0.9",
                 "--per-channel", "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().out == ""
    spec = onnx_snn.spec(onnx_snn.load(out))
    assert len(spec.calibration["layers"][0]["lambda"]) == 32 and spec.calibration["mode"] == "0.9"


@pytest.mark.parametrize("args,message", [
    (["--mode", "150%"], "percentile must be in (0, 100]"),
    (["--mode", "2"], "fraction of the max"),
    (["--bins", "1000"], "power of two"),
    (["--mode", "search"], "give target_T (--target-T on the command line)"),
])
def test_bad_options_exit_2_with_a_message(args, message, calib_npz, tmp_path, capsys):
    out = tmp_path / "never.onnx"
    rc = main(["convert", str(SAMPLE_ONNX), "--calib", str(calib_npz), "-o", str(out), "-q"] + args)
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".never*"))  # nothing half-written


def test_missing_model_and_overwriting_the_input(calib_npz, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.onnx"), "--calib", str(calib_npz)]) == 2
    assert "does not exist" in capsys.readouterr().err
    copy = tmp_path / "m.onnx"
    copy.write_bytes(SAMPLE_ONNX.read_bytes())
    assert main(["convert", str(copy), "--calib", str(calib_npz), "-o", str(copy), "-q"]) == 2
    assert "--force" in capsys.readouterr().err
    assert copy.read_bytes() == SAMPLE_ONNX.read_bytes()


def test_console_script_is_installed(calib_npz, tmp_path):
    script = Path(sys.executable).parent / "onnx-snn"
    assert script.exists(), "pip install -e . should install the onnx-snn console script"
    result = subprocess.run([str(script), "convert", str(SAMPLE_ONNX), "--calib", str(calib_npz), "-o",
                             str(tmp_path / "x.snn.onnx"), "-q"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x.snn.onnx").exists()


def test_info_says_what_runs(capsys, monkeypatch):
    import onnxruntime as ort
    from onnx_snn_runtime import native
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"onnxruntime {ort.__version__}" in out and "CPUExecutionProvider" in out
    if native.available():
        assert f"native kernels: {native.library()}, loads" in out and "chunk execution" in out
    monkeypatch.setenv(native.ENV, "")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "native kernels: not built" in out and "build_kernels.sh" in out and "function bodies" in out


def test_run_takes_execution_and_kernels(sample_snn, capsys):
    args = ["run", str(sample_snn), "--T", "3", "--limit", "20", "-q", "--execution", "chunk", "--kernels", "onnx"]
    assert main(args) == 0
    assert "chunk execution, onnx kernels" in capsys.readouterr().out


def test_run_and_plot_accuracy_show_the_anns_accuracy_on_the_same_samples(sample_snn, bundled, tmp_path, capsys):
    import onnxruntime as ort
    x, y = bundled[2][:40], bundled[3][:40]
    npz = tmp_path / "test.npz"
    np.savez(npz, x=x, y=y)
    ann = ort.InferenceSession(str(SAMPLE_ONNX), providers=["CPUExecutionProvider"])
    expected = float(np.mean(ann.run(None, {"input": x})[0].argmax(1) == y))
    assert main(["run", str(sample_snn), "--data", str(npz), "--T", "3", "-q", "--ann", str(SAMPLE_ONNX)]) == 0
    assert f"accuracy on 40 samples (ANN: {expected:.4f})" in capsys.readouterr().out
    out = tmp_path / "acc.png"
    assert main(["plot", "accuracy", str(sample_snn), "--data", str(npz), "--T", "3", "-q", "--ann",
                 str(SAMPLE_ONNX), "-o", str(out)]) == 0
    assert f"(ANN: {expected:.4f} on the same 40 samples)" in capsys.readouterr().out
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["run", str(sample_snn), "--data", str(npz), "--T", "3", "-q", "--ann", str(npz)]) == 2
    assert "--ann" in capsys.readouterr().err


def test_plot_neuron_takes_v_init_half_as_convert_does(tmp_path, capsys):
    from onnx_snn import plots
    assert main(["plot", "neuron", "--T", "16", "--v-init", "half", "-o", str(tmp_path / "n.png")]) == 0
    half = plots.plot_if_neuron(str(tmp_path / "m.png"), T=16, v_init=0.5)
    assert f"{np.abs(half.rates - half.relu).max():.4f}" in capsys.readouterr().out
    assert main(["plot", "neuron", "--v-init", "most", "-o", str(tmp_path / "x.png")]) == 2
    assert "give a number (in thresholds) or 'half'" in capsys.readouterr().err


def test_plot_help_describes_each_figure():
    text = subprocess.run([sys.executable, "-m", "onnx_snn", "plot", "--help"], capture_output=True, text=True).stdout
    for figure in ("neuron    spike trains", "firing    a step model's", "accuracy  a step model's"):
        assert figure in text


def test_output_into_a_closed_pipe_ends_without_a_traceback(sample_snn):
    """`onnx-snn run ... | head -1`: the reader leaves after one line (unbuffered, so that the next
    line is written, and refused, while the command runs)."""
    import os
    proc = subprocess.Popen([sys.executable, "-m", "onnx_snn", "run", str(sample_snn), "--T", "20", "--limit", "50",
                             "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.stdout.readline()
    proc.stdout.close()  # as head does after its line
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
