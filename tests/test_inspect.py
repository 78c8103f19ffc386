"""`onnx-snn inspect`: what the converter will do to an ANN, and what a step model holds."""
import json

import numpy as np
from conftest import SAMPLE_ONNX
from onnx_builder import GraphBuilder

import onnx_snn
from onnx_snn.cli import main
from onnx_snn.inspect import inspect


def test_ann_report_lists_neurons_folds_and_no_refusal():
    report = inspect(SAMPLE_ONNX)
    assert report["kind"] == "ann" and report["unsupported"] == []
    assert [n["op"] for n in report["neurons"]] == ["Relu"] * 3
    assert len(report["batchnorms"]) == 3
    assert all(b["becomes"].startswith("folds into ") and "Conv" in b["becomes"] for b in report["batchnorms"])
    assert report["ops"]["Conv"] == 3


def test_ann_report_names_what_the_converter_refuses(tmp_path, capsys):
    b = GraphBuilder(seed=2)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(2, 1, 3, 3)])])
    y = b.op("Sigmoid", [b.bn(h, 2)])
    y = b.op("Mul", [y, b.op("Relu", [h])])
    path = tmp_path / "odd.onnx"
    path.write_bytes(b.model({"x": ["N", 1, 6, 6]}, [y]).SerializeToString())
    report = inspect(path)
    assert any(u["op"] == "Sigmoid" and "no SNN equivalent" in u["why"] for u in report["unsupported"])
    assert any(u["op"] == "Mul" and "two activations" in u["why"] for u in report["unsupported"])
    assert [bn["becomes"] for bn in report["batchnorms"]] == ["per-channel Mul+Add"]  # after a ReLU: no fold
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "node(s) the converter refuses" in out and "Sigmoid" in out


def test_step_model_report_has_every_layer_with_scale_threshold_shape_and_init(bundled, tmp_path, capsys):
    snn = onnx_snn.Converter(bundled[0], "99.9%", v_init="half", progress=False)(SAMPLE_ONNX)
    path = tmp_path / "cnn.snn.onnx"
    onnx_snn.save(snn, path)
    spec = onnx_snn.spec(snn)
    report = inspect(path)
    assert report["kind"] == "step" and report["calibration_mode"] == "99.9%"
    assert [L["state"] for L in report["layers"]] == [s.input for s in spec.states]
    for layer, entry in zip(report["layers"], spec.calibration["layers"]):
        assert np.allclose(layer["lambda"], entry["lambda"]) and layer["threshold"] == 1.0
        assert layer["init"] == "0.5" and layer["reset"] == "subtract"
    assert report["layers"][0]["shape"] == ["N", 32, 26, 26]
    assert sum(n["op"] == "onnx_snn.IFNeuron" for n in report["nodes"]) == 3
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][2]["state"] == "snn.v2"
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "initial potential" in text and "subtract" in text and "onnx_snn.IFNeuron" in text


def test_inspect_a_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_output_softmax_is_dropped_not_refused_and_refused_clips_are_not_neurons(tmp_path):
    b = GraphBuilder(seed=3)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(2, 1, 3, 3)])])
    odd = b.op("Clip", [h, b.const(np.array(-1.0, np.float32)), b.const(np.array(1.0, np.float32))])
    y = b.op("Softmax", [b.op("Gemm", [b.op("Flatten", [odd]), b.rand(2 * 4 * 4, 3)])], axis=1)
    path = tmp_path / "softmax.onnx"
    path.write_bytes(b.model({"x": ["N", 1, 6, 6]}, [y]).SerializeToString())
    report = inspect(path)
    assert [u["op"] for u in report["unsupported"]] == ["Clip"]  # min -1: refused; the Softmax is dropped
    assert [n["op"] for n in report["neurons"]] == ["Relu"]
