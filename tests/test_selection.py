"""The self-validating preset: candidates tried on held-out calibration data, the best kept."""
import logging

import numpy as np
import pytest
from onnx import numpy_helper
from onnx_builder import GraphBuilder
from onnx_snn_runtime import Simulator

import onnx_snn
from onnx_snn import presets, selection
from onnx_snn.model_util import cpu_session

T = 4


def net():
    b = GraphBuilder(seed=11)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(6, 1, 3, 3), b.rand(6)])])
    h = b.op("Relu", [b.op("Conv", [h, b.rand(6, 6, 3, 3), b.rand(6)])])
    y = b.op("Gemm", [b.op("Flatten", [h]), b.rand(4, 6 * 4 * 4), b.rand(4)], transB=1)
    return b.model({"x": ["N", 1, 8, 8]}, [y])


def data(n=200, seed=5):
    return np.random.default_rng(seed).random((n, 1, 8, 8)).astype(np.float32)


def weights(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_each_candidate_is_scored_on_held_out_data_and_the_best_is_kept():
    x, model = data(), net()
    converter = onnx_snn.Converter(x, target_T=T, progress=False)
    snn = converter(model)
    chosen = converter.selection
    h = selection.held_out_size(len(x))
    assert chosen.metric == "agreement" and chosen.held_out == h == 40 and chosen.T == T
    held, rest = x[::5], np.delete(x, np.arange(0, len(x), 5), axis=0)  # every fifth sample is held out
    assert [t.label for t in chosen.trials] == [label for label, _ in presets.candidates({})]
    scores = [(t.score, -t.error) for t in chosen.trials]
    assert chosen.chosen == chosen.trials[scores.index(max(scores))].label
    # the scores are those of each candidate calibrated on the rest of the data, simulated for T steps
    reference = cpu_session(model).run(None, {"x": held})[0]
    for trial, (_, recipe) in zip(chosen.trials, presets.candidates({})):
        alone = onnx_snn.Converter(rest, target_T=T, select_recipe=False, progress=False, **recipe)(model)
        out = Simulator(alone.SerializeToString(), "cpu").run(held, T, per_step=False)
        assert trial.score == np.mean(out.argmax(1) == reference.argmax(1))
        assert trial.error == pytest.approx(np.mean((out.astype(np.float64) - reference) ** 2), rel=1e-9)
        if trial.label == chosen.chosen:
            assert all(np.array_equal(a, b) for a, b in zip(weights(alone).values(), weights(snn).values()))
    # the step model records the trials and the choice
    recorded = onnx_snn.spec(snn).converter
    assert recorded["selection"] == chosen.to_json() and recorded["preset"] is True
    assert converter.describe().startswith("preset for T=4")


def test_labelled_batches_are_scored_by_accuracy():
    x, model = data(), net()
    y = np.random.default_rng(0).integers(0, 4, len(x))
    batches = [(x[i:i + 25], y[i:i + 25]) for i in range(0, len(x), 25)]
    converter = onnx_snn.Converter(batches, target_T=T, progress=False)
    converter(model)
    chosen = converter.selection
    assert chosen.metric == "accuracy" and chosen.held_out == 50  # whole batches: the first two
    best = next(t for t in chosen.trials if t.label == chosen.chosen)
    out = Simulator(converter(model).SerializeToString(), "cpu").run(x[:50], T, per_step=False)
    assert best.score == np.mean(out.argmax(1) == y[:50])


def test_explicit_options_override_every_candidate():
    converter = onnx_snn.Converter(data(), target_T=T, per_channel=False, v_init=0.25, progress=False)
    converter(net())
    for trial in converter.selection.trials:
        assert trial.options.get("per_channel", False) is False and trial.options["v_init"] == 0.25


def test_no_selection_without_enough_data(caplog):
    converter = onnx_snn.Converter(data()[:100], target_T=T, progress=False)
    with caplog.at_level(logging.WARNING, logger="onnx_snn.selection"):
        snn = converter(net())
    assert converter.selection is None and "no recipe selection" in caplog.text
    assert "selection" not in onnx_snn.spec(snn).converter
    assert converter.options()["mode"] == presets.CANDIDATES[0][1]["mode"]


def test_data_read_once_is_refused_when_several_passes_read_it():
    x = data()
    converter = onnx_snn.Converter((b for b in (x[:100], x[100:])), target_T=T, progress=False)
    with pytest.raises(onnx_snn.errors.DataError, match="can be read only once.*Calibrate.*CorrectBias"):
        converter(net())


def test_select_recipe_off_applies_the_first_candidate():
    converter = onnx_snn.Converter(data(), target_T=T, select_recipe=False, progress=False)
    converter(net())
    assert converter.selection is None and converter.options()["bias_correction"] is True


def test_a_failing_candidate_is_reported_and_skipped(monkeypatch):
    bad = ("broken", dict(mode="search", per_channel=True, v_init=2.0))  # made to fail below
    kept = presets.CANDIDATES[2]
    monkeypatch.setattr(presets, "CANDIDATES", [bad, kept])
    original = selection._score

    def failing(model, *args):
        if onnx_snn.spec(model).converter["v_init"] == 2.0:
            raise onnx_snn.errors.OnnxSnnError("simulated failure")
        return original(model, *args)
    monkeypatch.setattr(selection, "_score", failing)
    converter = onnx_snn.Converter(data(), target_T=T, progress=False)
    converter(net())
    assert converter.selection.trials[0].failure == "simulated failure"
    assert converter.selection.chosen == kept[0]


def test_cli_convert_prints_the_trials(tmp_path, capsys):
    from onnx_snn.cli import main
    from onnx_snn.io import save
    save(net(), tmp_path / "net.onnx")
    np.savez(tmp_path / "calib.npz", x=data())
    assert main(["convert", str(tmp_path / "net.onnx"), "--calib", str(tmp_path / "calib.npz"), "--target-T", "4",
                 "-o", str(tmp_path / "snn.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "recipe chosen on 40 held-out samples at T=4 by agreement" in printed
    assert printed.count(" * ") == 1


def test_tuning_is_skipped_when_its_estimated_time_exceeds_the_budget(monkeypatch):
    monkeypatch.setattr(selection, "TUNING_BUDGET", 0.0)
    monkeypatch.setattr(selection, "MIN_TUNING_BUDGET", 0.0)
    converter = onnx_snn.Converter(data(), target_T=T, progress=False)
    snn = converter(net())
    tuned = [t for t in converter.selection.trials if t.options.get("threshold_tuning")]
    assert tuned and all(t.skipped.startswith("threshold tuning would take about") for t in tuned)
    assert converter.selection.chosen not in {t.label for t in tuned}
    recorded = onnx_snn.spec(snn).converter["selection"]["trials"]
    assert [("skipped" in t) for t in recorded] == [bool(t.options.get("threshold_tuning"))
                                                    for t in converter.selection.trials]


def test_the_ann_reference_is_computed_a_calibration_batch_at_a_time():
    x, model = data(50), net()
    whole = cpu_session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(selection._ann_outputs(model, {"x": x}, 7), whole.astype(np.float64))


def test_scoring_simulates_fewer_images_at_once_when_their_states_are_large(monkeypatch):
    """The held-out images are simulated at most batch_size at a time, fewer when their states
    would pass SCORE_MEMORY (ResNet-50 at 224); the scores do not depend on it."""
    x, model = data(40), net()
    converter = onnx_snn.Converter(x, target_T=T, select_recipe=False, progress=False)
    snn = converter(model)
    reference = cpu_session(model).run(None, {"x": x})[0].astype(np.float64)
    expected = reference.argmax(1)
    batches = []
    run = Simulator.run
    monkeypatch.setattr(Simulator, "run", lambda self, feeds, *a, **k: batches.append(len(feeds["x"])) or
                        run(self, feeds, *a, **k))
    whole = selection._score(snn, converter.record, {"x": x}, T, expected, reference, 16)
    assert batches == [16, 16, 8]
    per_image = 3 * (6 * 6 * 6 + 6 * 4 * 4) * 4  # 3 x the bytes of both layers' potentials
    monkeypatch.setattr(selection, "SCORE_MEMORY", 5 * per_image)
    batches.clear()
    assert selection._score(snn, converter.record, {"x": x}, T, expected, reference, 16) == whole
    assert batches == [5] * 8
