"""One reader of user data for the converter and the runtime: integer images scaled, a missing
channel axis added, .npz arrays chosen by name, and errors that say which axis is wrong."""
import logging

import numpy as np
import pytest
from conftest import ROOT, SAMPLE_ONNX
from onnx_builder import GraphBuilder
from onnx_snn_runtime import DataError, Simulator
from onnx_snn_runtime.data import labelled_source, prepare

import onnx_snn
from onnx_snn.calibration.data import InputSpec, calibration_source, iterate_batches
from onnx_snn.cli import main

SUBSET = ROOT / "models" / "data" / "fashion_mnist_subset.npz"


@pytest.fixture(scope="module")
def subset():
    with np.load(SUBSET) as z:
        return {k: z[k] for k in z.files}


def lambdas(data, model=SAMPLE_ONNX, mode="99.9%"):
    converter = onnx_snn.Converter(data, mode, progress=False, batch_size=64)
    snn = converter(model)
    return snn, [np.asarray(e["lambda"], np.float64) for e in converter.report]


def test_uint8_calibration_gives_the_lambdas_of_float_images(subset):
    images = subset["x_calib"][:200]                         # uint8 [200, 28, 28], no channel axis
    _, from_uint8 = lambdas(images)
    _, from_float = lambdas(images[:, None].astype(np.float32) / 255)
    for a, b in zip(from_uint8, from_float):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    assert max(float(a.max()) for a in from_uint8) < 20      # not ~1189, as unscaled uint8 gave


def test_convert_cli_takes_the_bundled_subset_as_it_is(tmp_path, capsys):
    out = tmp_path / "cnn.snn.onnx"
    assert main(["convert", str(SAMPLE_ONNX), "--calib", str(SUBSET), "-o", str(out), "-q"]) == 0
    assert out.is_file()
    out2 = tmp_path / "named.snn.onnx"
    assert main(["convert", str(SAMPLE_ONNX), "--calib", f"{SUBSET}:x_test", "-o", str(out2), "-q"]) == 0
    assert onnx_snn.spec(onnx_snn.load(out2)).calibration["samples"] == 2000


def test_npz_arrays_by_name_and_by_default(tmp_path, subset, caplog):
    spec = [InputSpec("input", (None, 1, 28, 28), np.dtype(np.float32))]
    caplog.set_level(logging.INFO)
    batches, count = iterate_batches(f"{SUBSET}:x_test", spec, 500)
    assert count == 4 and sum(len(b["input"]) for b in batches) == 2000
    batches, count = iterate_batches(SUBSET, spec, 500)         # no x/images/inputs: x_calib
    assert count == 2 and "'x_calib'" in caplog.text
    with pytest.raises(DataError, match="no array 'x_val'.*x_calib, y_calib, x_test, y_test"):
        iterate_batches(f"{SUBSET}:x_val", spec, 500)
    data, words = calibration_source(f"{SUBSET}:x_test", 300)
    assert data.shape == (300, 28, 28) and "'x_test'" in words and "first 300 of 2000" in words
    data, words = calibration_source("fashion-mnist", None)     # 10 000 by default, when there are
    full = "full set from" in words
    assert words.startswith("calibration data: Fashion-MNIST training split, ")
    assert words.endswith("first 10000 of 60000 images" if full else "all 1000 images")
    assert len(data) == (10_000 if full else 1000)
    data, words = calibration_source("fmnist", 200)
    assert len(data) == 200 and words.endswith(f"first 200 of {60000 if full else 1000} images")
    with pytest.raises(DataError, match="does not exist.*fashion-mnist"):
        calibration_source(str(tmp_path / "nope.npz"), None)

    pair, words = labelled_source(f"{SUBSET}:x_calib", 100)      # labels: the matching y_calib
    assert len(pair[0]) == 100 and "'x_calib' and 'y_calib'" in words and "first 100 of 1000" in words
    pair, words = labelled_source(SUBSET)                        # evaluation prefers x_test
    assert len(pair[0]) == 2000 and "'x_test' and 'y_test'" in words
    np.savez(tmp_path / "nolabels.npz", images=subset["x_test"][:5])
    with pytest.raises(DataError, match="no labels for array 'images'"):
        labelled_source(tmp_path / "nolabels.npz")


def nhwc_model():
    """A Keras/tf2onnx-like model: channels-last input [N, 6, 6, 1], transposed to NCHW."""
    g = GraphBuilder(seed=3)
    x = g.op("Transpose", ["x"], perm=[0, 3, 1, 2])
    x = g.op("Relu", [g.op("Conv", [x, g.rand(4, 1, 3, 3), g.rand(4)])])
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    return g.model({"x": ["N", 6, 6, 1]}, [g.op("Gemm", [x, g.rand(2, 4), g.rand(2)], transB=1)])


def test_channels_last_input_gets_its_channel_axis_at_the_end(tmp_path, caplog):
    images = np.random.default_rng(0).integers(0, 256, (40, 6, 6), dtype=np.uint8)
    snn, got = lambdas(images, nhwc_model(), "max")
    _, expected = lambdas(images[..., None].astype(np.float32) / 255, nhwc_model(), "max")
    np.testing.assert_allclose(got, expected, rtol=1e-5)

    onnx_snn.save(snn, tmp_path / "nhwc.snn.onnx")
    sim = Simulator(tmp_path / "nhwc.snn.onnx", "cpu")
    caplog.set_level(logging.INFO)
    labels = np.arange(40) % 2
    ev = sim.evaluate((images, labels), 4, batch_size=8, progress=False)   # 5 batches
    reference = sim.evaluate((images[..., None] / np.float32(255), labels), 4, progress=False)
    np.testing.assert_array_equal(ev.accuracy, reference.accuracy)
    said = [r.getMessage() for r in caplog.records]
    assert sum("divided by 255" in m for m in said) == 1, said   # once per source, not per batch
    assert sum("no channel axis: added as axis 3" in m for m in said) == 1, said
    assert sum(m.startswith("evaluation data: an (x, y) pair of arrays: all 40 samples") for m in said) == 2


def test_calibration_says_once_per_source_that_it_scaled(caplog):
    caplog.set_level(logging.INFO)
    spec = [InputSpec("input", (None, 1, 28, 28), np.dtype(np.float32))]
    images = np.zeros((100, 28, 28), np.uint8)
    batches, count = iterate_batches(images, spec, 10)
    assert count == 10 and all(b["input"].shape == (10, 1, 28, 28) for b in batches)
    said = [r.getMessage() for r in caplog.records]
    assert sum(m == "calibration data: input 'input' is uint8: divided by 255 to [0, 1]" for m in said) == 1, said
    assert sum("no channel axis" in m for m in said) == 1, said


@pytest.mark.parametrize("shape,data,why", [
    ((None, 3, 8, 8), (4, 8, 8), r"the channel axis \(axis 1, 3 channels\) is missing"),
    (("N", 8, 8, 3), (4, 8, 8), r"the channel axis \(last, 3 channels\) is missing"),
    ((None, 3, 8, 8), (3, 8, 8), "the batch axis is missing"),
    ((None, 1, 28, 28), (28, 28), "the batch and channel axes are missing"),
    ((None, 1, 28, 28), (4, 28, 28, 1), "channels last and the model channels first"),
    ((None, 1, 28, 28), (4, 1, 28, 27), "axis 3 is 27, not 28"),
    ((None, 1, 28, 28), (4, 28, 28, 1, 1), "5 axes where the model has 4"),
])
def test_shape_errors_say_which_axis(shape, data, why):
    with pytest.raises(DataError, match=why) as e:
        prepare(np.zeros(data, np.float32), list(shape), np.float32, "img")
    shown = "(" + ", ".join("N" if i == 0 and not isinstance(d, int) else str(d) for i, d in enumerate(shape)) + ")"
    assert f"input 'img' has shape {data}" in str(e.value) and f"expects {shown}" in str(e.value)
    spec = [InputSpec("img", tuple(d if isinstance(d, int) else None for d in shape), np.dtype(np.float32))]
    with pytest.raises(DataError, match="calibration batch 0: input 'img' has shape.*" + why):
        next(iterate_batches(np.zeros(data, np.float32), spec, 64)[0])


def test_non_numbers_and_non_finite_values_are_refused_by_both():
    for bad, match in ((np.array([["a"] * 4]), "dtype"), (np.full((1, 4), np.inf, np.float32), "NaN or Inf")):
        with pytest.raises(DataError, match=match):
            prepare(bad, [None, 4], np.float32, "v")
        with pytest.raises(DataError, match=match):
            next(iterate_batches(bad, [InputSpec("v", (None, 4), np.dtype(np.float32))], 8)[0])


def test_run_cli_says_which_data_it_used(tmp_path, subset, capsys):
    snn, _ = lambdas(subset["x_calib"][:64], mode="max")
    onnx_snn.save(snn, tmp_path / "cnn.snn.onnx")
    assert main(["run", str(tmp_path / "cnn.snn.onnx"), "--data", f"{SUBSET}:x_test", "--T", "4",
                 "--limit", "64"]) == 0
    printed = capsys.readouterr().out
    assert "evaluation data: " in printed and "'x_test' and 'y_test': first 64 of 2000 samples" in printed
    assert "accuracy on 64 samples" in printed


def test_the_environment_chooses_what_auto_means(monkeypatch):
    from onnx_snn_runtime.datasets import SOURCE_ENV, fashion_mnist
    from onnx_snn_runtime.errors import DataError
    monkeypatch.setenv(SOURCE_ENV, "bundled")
    x, y, origin = fashion_mnist("test")
    assert len(x) == len(y) == 2000 and origin.startswith("bundled subset")
    monkeypatch.setenv(SOURCE_ENV, "most")
    with pytest.raises(DataError, match="ONNX_SNN_FASHION_MNIST='most'"):
        fashion_mnist("test")
    assert len(fashion_mnist("test", source="bundled")[0]) == 2000  # an explicit source wins
