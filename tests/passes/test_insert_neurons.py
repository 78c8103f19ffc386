"""InsertNeurons: every calibrated ReLU/Clip becomes Mul(1/λ) -> IF neuron (or Clip(0, 1)) -> Mul(λ)."""
import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx import numpy_helper
from onnx_builder import GraphBuilder

from onnx_snn.converter import Converter
from onnx_snn.errors import CalibrationError, OptionError
from onnx_snn.ops import if_neuron
from onnx_snn.ops.if_neuron import if_step
from onnx_snn.passes.base import ContractError, PassManager
from onnx_snn.passes.insert_neurons import InsertNeurons
from onnx_snn.record import Calibration, ConversionRecord, NeuronSite


def mlp():
    """x -> Gemm -> ReLU -> Gemm -> ReLU, with its weights for the numpy reference."""
    b = GraphBuilder(seed=1)
    w1, b1, w2, b2 = b.rand(6, 8), b.rand(8), b.rand(8, 4), b.rand(4)
    h = b.op("Relu", [b.op("Gemm", ["x", w1, b1])])
    y = b.op("Relu", [b.op("Gemm", [h, w2, b2])])
    model = b.model({"x": ["N", 6]}, [y])
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return model, [weights[n] for n in (w1, b1, w2, b2)]


def cnn():
    b = GraphBuilder(seed=2)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(4, 2, 3, 3), b.rand(4)])])
    h = b.op("Clip", [b.op("Conv", [h, b.rand(3, 4, 3, 3), b.rand(3)]), b.const(np.float32(0)),
                      b.const(np.float32(6))])
    y = b.op("Gemm", [b.op("Flatten", [h]), b.rand(3 * 2 * 2, 5), b.rand(5)])
    return b.model({"x": ["N", 2, 6, 6]}, [y])


def data(shape, n=128, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def calibrated(model, x, mode=0.5, **options):
    """The model and record as InsertNeurons receives them in the converter's pipeline."""
    converter = Converter(x, mode=mode, progress=False, **options)
    passes = converter.passes()
    k = next(i for i, p in enumerate(passes) if isinstance(p, InsertNeurons))
    return PassManager(passes[:k], check=True)(model, ConversionRecord(converter.config)), converter.config


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("per_channel", [False, True])
def test_each_site_becomes_scale_neuron_scale_with_its_state(per_channel):
    model, x = cnn(), data((2, 6, 6))
    before, options = calibrated(model, x, per_channel=per_channel)
    pass_ = InsertNeurons("if", options)
    result = pass_(before.model, before.record)
    out, record = result.model, result.record
    assert result.modified
    assert not [n for n in out.graph.node if n.op_type in ("Relu", "Clip")]
    assert [s.state.input for s in record.sites] == ["snn.v0", "snn.v1"]
    assert record.states == [s.state for s in record.sites]
    inputs, outputs = [i.name for i in out.graph.input], [o.name for o in out.graph.output]
    assert inputs == ["x", "snn.v0", "snn.v1"]
    assert outputs[1:] == ["snn.v0.next", "snn.v1.next"]
    channels = [4, 3]
    for site, c, hw in zip(record.sites, channels, [4, 2]):
        scale_in, neuron, scale_out = (node(out, n) for n in (site.scale_in, site.neuron, site.scale_out))
        assert (scale_in.op_type, neuron.op_type, neuron.domain, scale_out.op_type) == \
            ("Mul", if_neuron.OP_TYPE, if_neuron.DOMAIN, "Mul")
        # wired in a chain that ends in the site's output tensor
        assert neuron.input[0] == scale_in.output[0] and scale_out.input[0] == neuron.output[0]
        assert list(neuron.input[1:]) == [site.state.input] and neuron.output[1] == site.state.output
        assert scale_out.output[0] == site.output
        lam = np.asarray(site.lam, np.float32)
        expected_shape = (c, 1, 1) if per_channel else ()  # broadcasts along axis 1
        np.testing.assert_allclose(init(out, scale_out.input[1]), lam.reshape(expected_shape), rtol=1e-7)
        np.testing.assert_allclose(init(out, scale_in.input[1]), 1 / lam.reshape(expected_shape), rtol=1e-6)
        assert site.state.shape == [None, c, hw, hw] and site.state.dtype == "float32"
        assert site.state.kind == "membrane" and site.state.layer == site.node and site.state.threshold == 1.0
    assert any(f.domain == if_neuron.DOMAIN for f in out.functions)
    assert any(o.domain == if_neuron.DOMAIN for o in out.opset_import)
    assert before.record.states == [] and before.record.sites[0].scale_in is None  # input record untouched
    onnx.checker.check_model(out)
    pass_.ensures(out, record)


def test_analog_model_is_relu_clipped_at_lambda():
    """neuron="analog": each ReLU becomes min(relu(z), λ); a fraction of the max clips the tails."""
    (model, weights), x = mlp(), data((6,))
    before, options = calibrated(model, x, mode=0.5)
    result = InsertNeurons("analog", options)(before.model, before.record)
    out = result.model
    assert not [n for n in out.graph.node if n.op_type == "Relu"]
    assert [node(out, s.neuron).op_type for s in result.record.sites] == ["Clip", "Clip"]
    assert result.record.states == [] and all(s.state is None for s in result.record.sites)
    assert [i.name for i in out.graph.input] == ["x"] and len(out.graph.output) == 1
    l1, l2 = (np.float32(s.lam) for s in result.record.sites)
    w1, b1, w2, b2 = weights
    z1 = x @ w1 + b1
    h = np.minimum(np.maximum(z1, 0), l1)
    z2 = h @ w2 + b2
    expected = np.minimum(np.maximum(z2, 0), l2)
    assert (z1 > l1).any() and (z2 > l2).any()  # the clipping is exercised
    got = run_ort(out, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    original = run_ort(model, {"x": x})[0]
    assert np.abs(got - original).max() > 0.1  # and the analog model is not the ANN


def test_if_steps_match_the_numpy_neuron():
    """One step from v = 0 (and two more, carrying the states) equals ``if_step`` layer by layer."""
    (model, weights), x = mlp(), data((6,))
    before, options = calibrated(model, x, mode=0.5)
    out = InsertNeurons("if", options)(before.model, before.record)
    sites = out.record.sites
    l1, l2 = (np.float32(s.lam) for s in sites)
    w1, b1, w2, b2 = weights
    v1, v2 = (s.state.initial(len(x)) for s in sites)
    assert not v1.any() and v1.shape == (len(x), 8) and v2.shape == (len(x), 4)
    fired = np.zeros(2)
    for _ in range(3):
        y, n1, n2 = run_ort(out.model, {"x": x, "snn.v0": v1, "snn.v1": v2})
        s1, e1 = if_step((x @ w1 + b1) * np.float32(1 / l1), v1)
        s2, e2 = if_step(((l1 * s1) @ w2 + b2) * np.float32(1 / l2), v2)
        np.testing.assert_allclose(n1, e1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(n2, e2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y, l2 * s2, rtol=1e-6, atol=0)
        fired += [s1.mean(), s2.mean()]
        v1, v2 = n1, n2
    assert (0 < fired).all() and (fired < 3).all()  # in each layer some neurons fire, some do not


def test_reset_mode_and_initial_potential_come_from_the_options():
    (model, _), x = mlp(), data((6,))
    before, options = calibrated(model, x, reset_mode="zero", v_reset=-0.25, v_init=0.5)
    result = InsertNeurons("if", options)(before.model, before.record)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in result.model.graph.node if n.op_type == if_neuron.OP_TYPE]
    assert len(attrs) == 2 and all(a["reset_mode"] == 1 and a["v_reset"] == -0.25 for a in attrs)
    assert [s.init for s in result.record.states] == [0.5, 0.5]
    # numbers: one step from v = 0.5 with a hard reset to -0.25
    v = {s.input: s.initial(len(x)) for s in result.record.states}
    _, n1, _ = run_ort(result.model, {"x": x, **v})
    w1, b1 = mlp()[1][:2]
    s1, e1 = if_step((x @ w1 + b1) * np.float32(1 / np.float32(result.record.sites[0].lam)), v["snn.v0"],
                     reset_mode="zero", v_reset=-0.25)
    assert s1.any() and (n1[s1 == 1] == np.float32(-0.25)).all()
    np.testing.assert_allclose(n1, e1, rtol=1e-5, atol=1e-5)


def test_missing_calibration_is_refused():
    model, _ = mlp()
    with pytest.raises(CalibrationError, match="Calibrate"):
        InsertNeurons()(model)
    with pytest.raises(CalibrationError, match=r"\[InsertNeurons\]"):
        PassManager([InsertNeurons()])(model)


def test_a_calibration_of_another_model_is_refused():
    model, _ = mlp()
    record = ConversionRecord(calibration=Calibration("max", False, 4),
                              sites=[NeuronSite("NotThere", "Relu", "t", 1.0, 1.0, 0.0)])
    with pytest.raises(CalibrationError, match="NotThere"):
        InsertNeurons()(model, record)


def test_unknown_neuron_is_refused():
    with pytest.raises(OptionError, match="neuron"):
        InsertNeurons("lif")


def test_ensures_catches_a_site_left_in_the_graph():
    (model, _), x = mlp(), data((6,))
    before, options = calibrated(model, x)
    model = before.model
    pass_ = InsertNeurons("if", options)
    result = pass_(model, before.record)
    pass_.ensures(result.model, result.record)
    with pytest.raises(ContractError, match="still in the graph"):
        pass_.ensures(model, result.record)  # the unconverted graph still holds the ReLUs


def test_a_maxpool_after_a_neuron_gets_a_running_max_state_in_input_order():
    b = GraphBuilder(seed=3)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(4, 2, 3, 3), b.rand(4)], pads=[1, 1, 1, 1])])
    h = b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("Relu", [b.op("Conv", [h, b.rand(3, 4, 3, 3), b.rand(3)], pads=[1, 1, 1, 1])])
    y = b.op("Gemm", [b.op("Flatten", [h]), b.rand(3 * 4 * 4, 5), b.rand(5)])
    model, x = b.model({"x": ["N", 2, 8, 8]}, [y]), data((2, 8, 8))
    before, options = calibrated(model, x)
    result = InsertNeurons("if", options)(before.model, before.record)
    out, record = result.model, result.record
    assert [s.input for s in record.states] == ["snn.v0", "snn.m0", "snn.v1"]
    assert [i.name for i in out.graph.input] == ["x"] + [s.input for s in record.states]
    assert [o.name for o in out.graph.output][1:] == [s.output for s in record.states]
    assert [s.kind for s in record.states] == ["membrane", "maxpool_sum", "membrane"]
    (pool,) = record.running_max
    assert pool.state is record.states[1] and pool.state.shape == [None, 4, 8, 8]
    assert "MaxPool" not in [n.op_type for n in out.graph.node if n.name == pool.node]
    # the analog model has no states: its MaxPool stays a plain MaxPool
    analog = InsertNeurons("analog", options)(before.model, before.record)
    assert analog.record.states == [] and analog.record.running_max == []
    assert [n.op_type for n in analog.model.graph.node].count("MaxPool") == 1
    lams = [np.float32(s.lam) for s in analog.record.sites]
    clipped = _relu_as_clip(before.model, lams)
    np.testing.assert_allclose(run_ort(analog.model, {"x": x})[0], run_ort(clipped, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def _relu_as_clip(model, lams):
    """``model`` with its k-th ReLU replaced by Clip(0, lams[k]): the reference for the analog model."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    k = 0
    for n in out.graph.node:
        if n.op_type == "Relu":
            lo, hi = f"ref.lo{k}", f"ref.hi{k}"
            out.graph.initializer.extend([numpy_helper.from_array(np.float32(0), lo),
                                          numpy_helper.from_array(np.float32(lams[k]), hi)])
            n.op_type = "Clip"
            n.input.extend([lo, hi])
            k += 1
    assert k == len(lams)
    return out
