"""Conversion recipes for low T: threshold search, half-threshold initial potential, target T."""
import numpy as np
import pytest
from onnx_builder import GraphBuilder
from onnx_snn_runtime import Simulator

import onnx_snn
from onnx_snn.calibration.search import quantised, search_threshold
from onnx_snn.calibration.stats import StreamingHistogram
from onnx_snn.cli import main
from onnx_snn.errors import OptionError


@pytest.mark.parametrize("T,v_init", [(4, 0.5), (8, 0.5), (16, 0.0)])
def test_threshold_search_finds_the_lambda_numpy_says_is_best(T, v_init):
    rng = np.random.default_rng(T)
    a = np.maximum(rng.standard_normal((20000, 1)) * 2 + rng.exponential(1.0, (20000, 1)), 0).astype(np.float32)
    hist = StreamingHistogram(1, 1 << 16)
    for chunk in np.array_split(a, 7):
        hist.update(chunk)
    chosen = search_threshold(hist, T, v_init)[0]
    lams = hist.max[0] * np.arange(1, 257) / 256
    exact = np.array([np.sum((a - quantised(a, lam, T, v_init)) ** 2) for lam in lams])  # on the raw values
    err = np.sum((a - quantised(a, chosen, T, v_init)) ** 2)
    assert err <= exact.min() * 1.01, (chosen, lams[exact.argmin()])
    assert chosen < hist.max[0]  # at low T the best scale clips the tail


def test_quantised_matches_an_if_neuron_simulation():
    """The search's error model is exactly what an IF neuron does with a constant input."""
    from onnx_snn.ops.if_neuron import if_step
    a = np.linspace(0, 1.3, 97)
    for v_init in (0.0, 0.5):
        v, total = np.full_like(a, v_init), 0
        for _ in range(8):
            s, v = if_step(a, v)
            total = total + s
        np.testing.assert_allclose(total / 8, quantised(a, 1.0, 8, v_init))


def constant_input_model():
    b = GraphBuilder()
    return b.model({"x": ["N", 50]}, [b.op("Relu", ["x"])])


def test_half_threshold_initial_potential_rounds_the_rate_code():
    x = np.random.default_rng(1).random((4, 50)).astype(np.float32)
    converter = onnx_snn.Converter(x, mode="max", v_init="half", progress=False)
    snn = converter(constant_input_model())
    assert onnx_snn.spec(snn).states[0].init == 0.5
    T = 8
    out = Simulator(snn.SerializeToString(), "cpu", optimize=False).run(x, T)[-1]
    lam = np.float32(converter.report[0]["lambda"])
    expected = lam * np.minimum(np.floor(x * np.float32(1 / np.float64(lam)) * T + 0.5), T)
    assert (np.abs(out - expected) > 1e-5).sum() <= 1  # a tie at .5 may round either way in float32


def test_target_T_is_recorded_and_run_uses_it(bundled, tmp_path, capsys):
    xc, _, xt, yt = bundled
    path = tmp_path / "m.snn.onnx"
    snn = onnx_snn.Converter(xc[:300], mode="search", target_T=8, v_init="half", progress=False)(
        onnx_snn.load(__import__("conftest").SAMPLE_ONNX))
    assert onnx_snn.spec(snn).converter["target_T"] == 8
    onnx_snn.save(snn, path)
    np.savez(tmp_path / "d.npz", x=xt[:200], y=yt[:200])
    assert main(["run", str(path), "--data", str(tmp_path / "d.npz"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "t=    8" in printed and "t=   16" not in printed


def test_search_beats_percentile_at_low_T_on_the_sample_cnn(bundled):
    xc, _, xt, yt = bundled
    source = onnx_snn.load(__import__("conftest").SAMPLE_ONNX)
    acc = {}
    for label, options in {"99.9%": dict(mode="99.9%"), "half": dict(mode="99.9%", v_init="half"),
                           "search": dict(mode="search", target_T=8, v_init="half")}.items():
        snn = onnx_snn.Converter(xc, progress=False, **options)(source)
        acc[label] = Simulator(snn.SerializeToString(), "cpu").evaluate((xt, yt), 8, batch_size=500,
                                                                        progress=False).accuracy[-1]
    print("accuracy at T=8:", acc)
    assert acc["search"] > acc["half"] > acc["99.9%"]


@pytest.mark.parametrize("options,match", [({"mode": "search"}, "target_T"), ({"v_init": "third"}, "v_init"),
                                           ({"target_T": 0}, "target_T"), ({"target_T": 2.5}, "target_T")])
def test_recipe_options_are_checked(options, match):
    with pytest.raises(OptionError, match=match):
        onnx_snn.Converter(np.zeros((1, 4), np.float32), **options)


def test_bias_correction_makes_mean_snn_outputs_match_the_ann_layer_by_layer():
    import json

    from onnx_snn_runtime.format import KEY_STATES, State

    from onnx_snn.passes.correct_bias import analog_model
    b = GraphBuilder(seed=4)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(4, 2, 3, 3), b.rand(4)])])
    y = b.op("Relu", [b.op("Conv", [h, b.rand(3, 4, 3, 3), b.rand(3)])])
    model = b.model({"x": ["N", 2, 8, 8]}, [b.op("ReduceMean", [y], axes=[2, 3])])
    x = np.random.default_rng(2).random((64, 2, 8, 8)).astype(np.float32)
    T = 4

    def states_of(snn):
        meta = {p.key: p.value for p in snn.metadata_props}
        return [State.from_json(d) for d in json.loads(meta[KEY_STATES])]

    def mean_errors(snn, reference):
        """Per layer: max over channels of |mean ANN output - mean SNN output after T steps|;
        the ANN is the rescaled original (``reference``'s IF neurons as Clip), not the shifted one."""
        from onnx_snn.model_util import probe_session as _session
        outputs = [e["output"] for e in onnx_snn.spec(reference).calibration["layers"]]
        targets = _session(analog_model(reference, states_of(reference)), outputs).run(outputs, {"x": x})
        return [np.abs((target - snn_mean(snn, {"x": x}, name, T)).mean(axis=(0, 2, 3))).max()
                for name, target in zip(outputs, targets)]

    # unfolded scales: the test reads each layer's output (λ * spikes), which folding removes
    plain = onnx_snn.Converter(x, mode="max", target_T=T, progress=False, fold_scales=False)(model)
    corrected = onnx_snn.Converter(x, mode="max", target_T=T, bias_correction=True, progress=False,
                                   fold_scales=False)(model)
    before, after = mean_errors(plain, plain), mean_errors(corrected, plain)
    print("per-channel mean |ANN - SNN| before / after bias correction:", before, after)
    assert all(a < 0.5 * b_ for a, b_ in zip(after, before))
    shifts = onnx_snn.spec(corrected).calibration["layers"][0]["bias_shift"]
    assert len(shifts) == 4 and all(s > 0 for s in shifts)  # too few spikes at T=4: shifted up

    def neuron_errors(snn):
        """Per layer: mean over neurons of |mean over the batch of (ANN - SNN)|."""
        from onnx_snn.model_util import probe_session
        outputs = [e["output"] for e in onnx_snn.spec(plain).calibration["layers"]]
        targets = probe_session(analog_model(plain, states_of(plain)), outputs).run(outputs, {"x": x})
        return [np.abs((target - snn_mean(snn, {"x": x}, name, T)).mean(axis=0)).mean()
                for name, target in zip(outputs, targets)]

    both = onnx_snn.Converter(x, mode="max", target_T=T, bias_correction=True, potential_correction=True,
                              progress=False, fold_scales=False)(model)
    init = onnx_snn.spec(both).states[0].init
    assert init.shape == (4, 6, 6) and 0 <= init.min() and init.max() <= 1  # per-neuron potentials
    bias_only, with_potential = neuron_errors(corrected), neuron_errors(both)
    print("per-neuron mean |ANN - SNN|, bias only / with potential correction:", bias_only, with_potential)
    assert all(p < b_ for p, b_ in zip(with_potential, bias_only))


def test_spike_count_output_decoding(bundled):
    xc, _, xt, yt = bundled
    converter = onnx_snn.Converter(xc, mode="99.9%", output_decoding="spikes", progress=False)
    snn = converter(onnx_snn.load(__import__("conftest").SAMPLE_ONNX))
    spec = onnx_snn.spec(snn)
    assert len(spec.states) == 4 and spec.outputs == {"logits": "sum"}
    lam = converter.report[-1]["lambda"]
    out = Simulator(snn.SerializeToString(), "cpu").run(xt[:500], 50)
    counts = out / np.float32(lam)
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)  # the readout is lambda x spike counts
    accuracy = (out[-1].argmax(-1) == yt[:500]).mean()
    assert accuracy > 0.85, accuracy


def test_bad_output_decoding_is_refused():
    with pytest.raises(OptionError, match="output_decoding"):
        onnx_snn.Converter(np.zeros((1, 4), np.float32), output_decoding="rates")


def test_target_T_alone_applies_the_preset_and_explicit_options_win():
    from onnx_snn import presets
    x = np.zeros((1, 4), np.float32)
    preset = onnx_snn.Converter(x, target_T=8).options()
    expected = presets.preset(8)
    assert preset["preset"] is True and preset["mode"] == str(onnx_snn.calibration.mode.parse_mode(expected["mode"]))
    assert {k: preset[k] for k in ("per_channel", "bias_correction", "potential_correction")} == \
        {k: expected[k] for k in ("per_channel", "bias_correction", "potential_correction")}
    assert preset["v_init"] == (0.5 if expected["v_init"] == "half" else expected["v_init"])
    overridden = onnx_snn.Converter(x, target_T=8, potential_correction=False, v_init=0.25).options()
    assert overridden["preset"] and not overridden["potential_correction"] and overridden["v_init"] == 0.25
    named = onnx_snn.Converter(x, "99.9%", target_T=8).options()  # a named mode: no preset, plain defaults
    assert not named["preset"] and named["mode"] == "99.9%" and not named["bias_correction"] and named["v_init"] == 0
    plain = onnx_snn.Converter(x).options()
    assert not plain["preset"] and plain["mode"] == "max" and plain["target_T"] is None


def test_cli_target_T_alone_converts_with_the_preset_and_run_defaults_to_it(bundled, tmp_path, capsys):
    xc, _, xt, yt = bundled
    np.savez(tmp_path / "c.npz", x=xc[:200])
    np.savez(tmp_path / "d.npz", x=xt[:100], y=yt[:100])
    out = tmp_path / "m.snn.onnx"
    assert main(["convert", str(__import__("conftest").SAMPLE_ONNX), "--calib", str(tmp_path / "c.npz"),
                 "--target-T", "4", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recipe chosen on 40 held-out samples at T=4 by agreement" in printed and "preset for T=4: mode" in printed
    options = onnx_snn.spec(onnx_snn.load(out)).converter
    assert options["preset"] and options["target_T"] == 4 and options["selection"]["held_out"] == 40
    assert main(["run", str(out), "--data", str(tmp_path / "d.npz"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "t=    4" in printed and "t=    8" not in printed


def residual_net(b: GraphBuilder) -> str:
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(4, 2, 3, 3), b.rand(4)])])
    g = b.op("Relu", [b.op("Conv", [h, b.rand(4, 4, 3, 3, scale=0.5), b.rand(4)], pads=[1, 1, 1, 1])])
    return b.op("Relu", [b.op("Add", [g, h])])  # a residual Add: the third layer reads both recordings


def maxpool_net(b: GraphBuilder) -> str:
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(4, 2, 3, 3), b.rand(4)])])
    p = b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])  # running_max: a state of its own
    g = b.op("Relu", [b.op("Conv", [p, b.rand(4, 4, 3, 3, scale=0.5), b.rand(4)], pads=[1, 1, 1, 1])])
    return b.op("Relu", [b.op("Conv", [g, b.rand(3, 4, 1, 1), b.rand(3)])])


@pytest.mark.parametrize("net", [residual_net, maxpool_net])
def test_correction_segments_fed_recorded_trains_compute_what_the_whole_model_does(net):
    """CorrectBias simulates each layer as a segment of the graph fed the upstream layers'
    recorded outputs: per step, exactly what the whole step model computes."""
    from onnx_snn_runtime.format import StepModelSpec
    from onnx_snn_runtime.loop import simulate

    from onnx_snn.model_util import probe_session
    from onnx_snn.passes.correct_bias import segment
    b = GraphBuilder(seed=5)
    model = b.model({"x": ["N", 2, 8, 8]}, [b.op("ReduceMean", [net(b)], axes=[2, 3])])
    x = np.random.default_rng(3).random((16, 2, 8, 8)).astype(np.float32)
    T = 6
    # the preset (corrected, per-neuron v_init); unfolded scales, since the test reads layer outputs
    snn = onnx_snn.Converter(x, target_T=T, progress=False, fold_scales=False)(model)
    spec = onnx_snn.spec(snn)
    outputs = [e["output"] for e in spec.calibration["layers"]]
    whole = simulate(probe_session(snn, outputs), {"x": x}, T, StepModelSpec(spec.states, {o: "sum" for o in outputs}))
    per_step = {o: np.concatenate([whole[o][:1], np.diff(whole[o], axis=0)]) for o in outputs}
    parts = [segment(snn, spec.states, o, set(outputs)) for o in outputs]
    assert parts[0].trains == [] and parts[1].trains == [outputs[0]]
    if net is residual_net:
        assert sorted(parts[2].trains) == sorted(outputs[:2])
    else:
        assert sorted(s.kind for s in parts[1].states) == ["maxpool_sum", "membrane"]  # its own, and the pool's
    assert sum(n.op_type == "Conv" for n in parts[1].model.graph.node) == 1  # only its own layer
    trains = {}
    for part in parts:
        trains[part.output] = part.run({"x": x}, trains, T, record=True)
        np.testing.assert_allclose(trains[part.output], per_step[part.output], rtol=1e-5, atol=1e-4)


def snn_mean(snn, feeds, output, T):
    """Mean over T steps of tensor ``output`` of the whole step model (the plain loop)."""
    from onnx_snn_runtime.format import StepModelSpec
    from onnx_snn_runtime.loop import simulate

    from onnx_snn.model_util import probe_session
    spec = StepModelSpec(onnx_snn.spec(snn).states, {output: "sum"})
    return simulate(probe_session(snn, [output]), feeds, T, spec, per_step=False)[output] / T


def test_cli_can_turn_off_a_preset_option():
    from onnx_snn.cli import build_parser
    parse = lambda *a: build_parser().parse_args(["convert", "m.onnx", "--calib", "c.npz", "--target-T", "8", *a])  # noqa: E731
    given = parse()
    assert (given.mode, given.per_channel, given.bias_correction, given.potential_correction, given.v_init) == \
        (None, None, None, None, None)  # not given: the preset decides
    off = parse("--no-potential-correction", "--no-per-channel")
    assert off.potential_correction is False and off.per_channel is False and off.bias_correction is None
