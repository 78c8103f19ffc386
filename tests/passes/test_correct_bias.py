"""CorrectBias: an Add(shift) before each neuron's scale_in brings its mean output after T steps
to the rescaled ANN's, channel by channel."""
import numpy as np
import pytest
from onnx import numpy_helper
from onnx_builder import GraphBuilder

from onnx_snn.converter import Converter
from onnx_snn.errors import OptionError
from onnx_snn.model_util import probe_session
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
