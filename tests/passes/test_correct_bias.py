"""CorrectBias: an Add(shift) before each neuron's scale_in brings its mean output after T steps
to the rescaled ANN's, channel by channel, with bounded memory."""
import copy
import logging

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper
from onnx_builder import GraphBuilder

from onnx_snn.converter import Converter
from onnx_snn.errors import OptionError
from onnx_snn.model_util import probe_session
from onnx_snn.passes import correct_bias
from onnx_snn.passes.base import ContractError, PassManager
from onnx_snn.passes.correct_bias import CorrectBias, analog_model
from onnx_snn.passes.fold_scales import FoldScales
from onnx_snn.record import ConversionRecord

T = 4


def net():
    b = GraphBuilder(seed=4)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(4, 2, 3, 3), b.rand(4)])])
    y = b.op("Relu", [b.op("Conv", [h, b.rand(3, 4, 3, 3), b.rand(3)])])
    return b.model({"x": ["N", 2, 8, 8]}, [b.op("ReduceMean", [y], axes=[2, 3])])


def data(n=64, seed=2):
    return np.random.default_rng(seed).random((n, 2, 8, 8)).astype(np.float32)


def before_correction(x, **options):
    """(pass, result of the passes before it): the converter's pipeline up to CorrectBias."""
    converter = Converter(x, mode="max", target_T=T, bias_correction=True, progress=False, **options)
    passes = converter.passes()
    k = next(i for i, p in enumerate(passes) if isinstance(p, CorrectBias))
    return passes[k], PassManager(passes[:k], check=True)(net(), ConversionRecord(converter.config))


def snn_means(model, record, x) -> list[np.ndarray]:
    """Each site's output (λ x spikes) averaged over T steps, simulated with onnxruntime."""
    names = [s.output for s in record.sites]
    session = probe_session(model, names + [s.output for s in record.states])
    state = {s.input: s.initial(len(x)) for s in record.states}
    total = None
    for _ in range(T):
        values = session.run(names + [s.output for s in record.states], {"x": x, **state})
        state = {s.input: v for s, v in zip(record.states, values[len(names):])}
        step = [v.astype(np.float64) for v in values[:len(names)]]
        total = step if total is None else [a + b for a, b in zip(total, step)]
    return [t / T for t in total]


def channel_errors(model, record, targets, x) -> list[np.ndarray]:
    """Per layer and channel: |mean ANN output - mean SNN output after T steps|."""
    return [np.abs((target - snn).mean(axis=(0, 2, 3))) for target, snn in zip(targets, snn_means(model, record, x))]


def test_shift_is_recorded_and_applied_before_scale_in():
    x = data()
    pass_, before = before_correction(x)
    result = pass_(before.model, before.record)
    out, record = result.model, result.record
    assert result.modified
    nodes = {n.name: n for n in out.graph.node}
    order = [n.name for n in out.graph.node]
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for site, channels in zip(record.sites, [4, 3]):
        assert site.shift == f"snn.{site.node}.bias_shift"
        add, scale_in = nodes[site.shift], nodes[site.scale_in]
        assert add.op_type == "Add" and scale_in.input[0] == add.output[0]
        assert order.index(site.shift) < order.index(site.scale_in)
        assert len(site.bias_shift) == channels  # one shift per channel
        np.testing.assert_allclose(inits[add.input[1]].reshape(-1), site.bias_shift, rtol=1e-6)
        assert inits[add.input[1]].shape == (channels, 1, 1)
    assert all(s > 0 for s in record.sites[0].bias_shift)  # too few spikes at T=4: shifted up
    assert all(s.shift is None and s.bias_shift is None for s in before.record.sites)  # input record untouched
    assert record.sites[0].to_json()["bias_shift"] == record.sites[0].bias_shift
    pass_.ensures(out, record)
    with pytest.raises(ContractError, match="no bias shift"):
        pass_.ensures(before.model, before.record)


def test_mean_snn_output_moves_to_the_anns():
    x = data()
    pass_, before = before_correction(x)
    after = pass_(before.model, before.record)
    names = [s.output for s in before.record.sites]
    targets = probe_session(analog_model(before.model, before.record.states), names).run(names, {"x": x})
    err_before = channel_errors(before.model, before.record, targets, x)
    err_after = channel_errors(after.model, after.record, targets, x)
    print("per-channel mean |ANN - SNN| before / after:", err_before, err_after)
    for b, a in zip(err_before, err_after):
        assert a.max() < 0.5 * b.max() and (a <= b + 1e-6).all()
    assert err_before[0].max() > 0.05  # the uncorrected error is real
    # the graph's only change: the Adds (the rest of the model computes as before)
    assert sorted(n.name for n in after.model.graph.node) == sorted(
        [n.name for n in before.model.graph.node] + [s.shift for s in after.record.sites])


def test_potential_correction_sets_initial_potentials_and_closes_the_gap_further():
    x = data()
    pass_, before = before_correction(x)
    bias_only = pass_(before.model, before.record)
    both_pass, _ = before_correction(x, potential_correction=True)
    both = both_pass(before.model, before.record)
    init = both.record.states[0].init
    assert np.shape(init) == (4, 6, 6) and 0 <= init.min() and init.max() <= 1 and init.max() > 0
    assert before.record.states[0].init == 0.0
    names = [s.output for s in before.record.sites]
    targets = probe_session(analog_model(before.model, before.record.states), names).run(names, {"x": x})

    def neuron_error(result):
        means = snn_means(result.model, result.record, x)
        return [np.abs((t - m).mean(axis=0)).mean() for t, m in zip(targets, means)]

    assert all(p < b for p, b in zip(neuron_error(both), neuron_error(bias_only)))


def test_needs_if_neurons_with_input_scales_and_a_target_T():
    x = data()
    pass_, before = before_correction(x)
    folded = FoldScales()(before.model, before.record)
    assert folded.modified
    with pytest.raises(ContractError, match="before FoldScales"):
        pass_(folded.model, folded.record)
    with pytest.raises(OptionError, match="target_T"):
        CorrectBias(x)


# -- bounded memory ----------------------------------------------------------------------------------

def wide_net():
    """A wide first layer (16 channels of 16 x 16: 16 KB per image) before a narrow one."""
    b = GraphBuilder(seed=5)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(16, 2, 3, 3), b.rand(16)], pads=[1, 1, 1, 1])])
    g = b.op("Relu", [b.op("Conv", [h, b.rand(4, 16, 3, 3), b.rand(4)])])
    y = b.op("Relu", [b.op("Add", [b.op("Conv", [g, b.rand(16, 4, 3, 3), b.rand(16)], pads=[1, 1, 1, 1]),
                                   b.op("Slice", [h, b.const(np.array([1, 1], np.int64)),
                                                  b.const(np.array([15, 15], np.int64)),
                                                  b.const(np.array([2, 3], np.int64))])])])
    return b.model({"x": ["N", 2, 16, 16]}, [b.op("ReduceMean", [y], axes=[2, 3])])


def corrected(x, model=None, **options):
    """(CorrectBias's result, the images it corrected on) for ``model`` (default ``wide_net``)."""
    converter = Converter(x, mode="max", target_T=T, bias_correction=True, potential_correction=True,
                          progress=False)
    passes = converter.passes()
    k = next(i for i, p in enumerate(passes) if isinstance(p, CorrectBias))
    before = PassManager(passes[:k], check=True)(model or wide_net(), ConversionRecord(converter.config))
    pass_ = CorrectBias(x, converter.config, **options)
    used, inputs = [], pass_._inputs

    def spy(*args):
        feeds = inputs(*args)
        used.append(len(feeds["x"]))
        return feeds

    pass_._inputs = spy
    return pass_, pass_(before.model, before.record), before, used[0]


def test_sample_count_is_bounded_by_bytes_not_images(caplog):
    """The pass corrects on as many images as its arrays fit in ``memory`` bytes (never fewer
    than MIN_SAMPLES): the recordings over T steps and the layers' own arrays per image, the
    rescaled ANN's outputs within TARGET_BYTES."""
    x = data(200, seed=3).repeat(2, axis=2).repeat(2, axis=3)
    pass_, _, before, _ = corrected(x)
    _, per_image, target_bytes = pass_.plan(before.model, before.record)
    sizes = [correct_bias._state_bytes(s.state) for s in before.record.sites]
    assert sizes == [16 * 16 * 16 * 4, 4 * 14 * 14 * 4, 16 * 14 * 14 * 4] and target_bytes == sum(sizes)
    # the first layer dominates: its recording in bits, its float64 arrays, its state in and out, the images
    assert per_image == T * sizes[0] // 32 + (6 + 2) * sizes[0] + 2 * 16 * 16 * 4
    caplog.set_level(logging.INFO, logger=correct_bias.log.name)
    for images, expected in [(40, 40), (3, correct_bias.MIN_SAMPLES), (10**6, 200)]:
        memory = correct_bias.TARGET_BYTES + images * per_image
        *_, used = corrected(x, memory=memory)
        assert used == expected
    assert f"bias correction on {correct_bias.MIN_SAMPLES} calibration images" in caplog.text


def test_targets_in_groups_and_steps_give_the_same_corrections(monkeypatch, caplog):
    """The rescaled ANN's outputs computed a few layers and a few images per run: the same
    shifts and initial potentials, bit for bit, as in one run."""
    x = data(64, seed=4).repeat(2, axis=2).repeat(2, axis=3)
    caplog.set_level(logging.INFO, logger=correct_bias.log.name)
    _, whole, _, _ = corrected(x)
    assert "runs over the" not in caplog.text
    monkeypatch.setattr(correct_bias, "TARGET_BYTES", 64 * 17 * 1024)  # about one layer per group
    monkeypatch.setattr(correct_bias, "RUN_BYTES", 5 * 25 * 1024)  # about 5 images per run
    _, parts, _, _ = corrected(x)
    assert "in 2 runs over the 64 images" in caplog.text
    assert parts.model.SerializeToString() == whole.model.SerializeToString()
    for a, b in zip(parts.record.states, whole.record.states):
        np.testing.assert_array_equal(a.init, b.init)


def test_recording_keeps_spike_trains_in_bits_and_returns_them_bit_for_bit():
    rng = np.random.default_rng(1)
    lam = rng.random((1, 5, 1, 1)).astype(np.float32)
    steps = [np.where(rng.random((3, 5, 4, 4)) < 0.3, lam, np.float32(0)).astype(np.float32) for _ in range(T)]
    steps[0][:, 2] = 0  # a channel that fires only later
    rec = correct_bias.Recording()
    for s in steps:
        rec.append(s)
    assert rec.packed is not None and rec.nbytes < sum(s.nbytes for s in steps) / 16 and len(rec) == T
    for t, s in enumerate(steps):
        assert rec[t].dtype == np.float32 and np.array_equal(rec[t].view(np.uint32), s.view(np.uint32))
    # anything else is kept as it is: a third level, a -0, a negative level
    for change in [lambda s: s.__setitem__((0, 1, 0, 0), 0.25), lambda s: s.__setitem__((0, 0, 0, 0), -0.0),
                   lambda s: s.__setitem__((slice(None), 3), -1.0)]:
        odd = [s.copy() for s in steps]
        change(odd[2])
        rec = correct_bias.Recording()
        for s in odd:
            rec.append(s)
        assert rec.packed is None
        for t, s in enumerate(odd):
            assert np.array_equal(rec[t].view(np.uint32), s.view(np.uint32))


def test_shifts_give_the_graph_graphsurgeon_would_export():
    """``_add_shift`` edits the model in place; the result is node for node (order included) what
    a graphsurgeon import, an appended Add and an export gave, for shifts added in any order."""
    from onnx_snn.graph import channel_shape, export_model, import_graph

    def reference(model, site, shift):
        graph = import_graph(model)
        scale_in = next(n for n in graph.nodes if n.name == site.scale_in)
        z = scale_in.inputs[0]
        base = f"snn.{site.node}"
        shifted = gs.Variable(f"{base}.shifted", dtype=z.dtype, shape=z.shape)
        value = np.asarray(channel_shape(shift, len(z.shape)), np.float32)
        graph.nodes.append(gs.Node("Add", f"{base}.bias_shift", inputs=[z, gs.Constant(f"{base}.bias_shift_value",
                                                                                      value)], outputs=[shifted]))
        scale_in.inputs[0] = shifted
        return export_model(graph, model)

    x = data(32).repeat(2, axis=2).repeat(2, axis=3)
    _, _, before, _ = corrected(x)
    rng = np.random.default_rng(0)
    for order in ([0, 1, 2], [2, 0, 1]):
        expected, model = before.model, correct_bias._copy(before.model)
        sites = copy.deepcopy(before.record.sites)
        for k in order:
            shift = rng.standard_normal(sites[k].state.shape[1])
            expected = reference(expected, sites[k], shift)
            correct_bias._add_shift(model, sites[k], shift)
            assert sites[k].shift == f"snn.{sites[k].node}.bias_shift"
            assert [n.SerializeToString() for n in model.graph.node] == \
                [n.SerializeToString() for n in expected.graph.node]
        assert export_model(import_graph(model), model).SerializeToString() == expected.SerializeToString()
