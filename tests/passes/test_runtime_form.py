"""EmbedRuntimeForm: prefix (once per batch) then body (once per step) computes the main graph."""
import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx_builder import GraphBuilder
from onnx_snn_runtime.format import KEY_RUNTIME_FORM, OUTPUT_SUM, RuntimeForm, metadata

from onnx_snn.converter import Converter
from onnx_snn.model_util import probe_model
from onnx_snn.ops import if_neuron
from onnx_snn.passes.base import ContractError, PassManager
from onnx_snn.passes.runtime_form import EmbedRuntimeForm
from onnx_snn.record import ConversionRecord

T = 4


def cnn():
    b = GraphBuilder(seed=7)
    h = b.op("Relu", [b.op("Conv", ["x", b.rand(4, 2, 3, 3), b.rand(4)])])
    h = b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("Relu", [b.op("Gemm", [b.op("Flatten", [h]), b.rand(4 * 2 * 2, 6), b.rand(6)])])
    return b.model({"x": ["N", 2, 6, 6]}, [b.op("Gemm", [h, b.rand(6, 3), b.rand(3)])])


def data(n=16, seed=3):
    return np.random.default_rng(seed).random((n, 2, 6, 6)).astype(np.float32)


def before_embedding(model, x, **options):
    converter = Converter(x, "max", progress=False, **options)
    passes = converter.passes()
    k = next(i for i, p in enumerate(passes) if isinstance(p, EmbedRuntimeForm))
    return PassManager(passes[:k], check=True)(model, ConversionRecord(converter.config))


def model_of(data: bytes) -> onnx.ModelProto:
    return onnx.load_model_from_string(data)


@pytest.mark.parametrize("fold_scales", [True, False])
def test_prefix_then_body_computes_the_main_graph(fold_scales):
    x = data()
    before = before_embedding(cnn(), x, fold_scales=fold_scales)
    result = EmbedRuntimeForm()(before.model, before.record)
    out, record = result.model, result.record
    assert result.modified
    # the main graph is unchanged; only the runtime form's metadata entry is added
    assert out.graph.SerializeToString() == before.model.graph.SerializeToString()
    added = set(metadata(out.metadata_props)) - set(metadata(before.model.metadata_props))
    assert added == {KEY_RUNTIME_FORM}
    assert [p.key for p in out.metadata_props].count(KEY_RUNTIME_FORM) == 1
    onnx.checker.check_model(out, full_check=True)
    form = RuntimeForm.from_json(metadata(out.metadata_props)[KEY_RUNTIME_FORM])
    prefix, body = model_of(form.prefix), model_of(form.body)
    onnx.checker.check_model(prefix, full_check=True)
    onnx.checker.check_model(body, full_check=True)
    # the prefix holds the first layer, and no neuron; the body holds every neuron
    assert [i.name for i in prefix.graph.input] == ["x"]
    assert [o.name for o in prefix.graph.output] == form.boundary
    assert not [n for n in prefix.graph.node if n.op_type == if_neuron.OP_TYPE]
    assert "Conv" in [n.op_type for n in prefix.graph.node] and "Conv" not in [n.op_type for n in body.graph.node]
    assert sum(n.op_type == if_neuron.OP_TYPE for n in body.graph.node) == len(record.sites) == 2
    # states: the step model's, then one output accumulator
    assert [s.input for s in form.states[:len(record.states)]] == [s.input for s in record.states]
    y_name = out.graph.output[0].name
    acc = form.states[len(record.states):]
    assert [(s.kind, s.layer) for s in acc] == [(OUTPUT_SUM, y_name)] and acc[0].shape == [None, 3]
    assert [c.layer for c in form.spike_counts] == [s.state.input for s in record.sites]
    assert [c.neurons for c in form.spike_counts] == [4 * 4 * 4, 6]

    # numbers: the body's states and accumulated output follow the main graph step by step
    spikes = [next(n for n in out.graph.node if n.name == s.neuron).output[0] for s in record.sites]
    main = probe_model(out, spikes)
    main_names = [y_name] + [s.output for s in record.states] + spikes
    boundary = dict(zip(form.boundary, run_ort(prefix, {"x": x})))
    state = {s.input: s.initial(len(x)) for s in record.states}
    body_state = {s.input: s.initial(len(x)) for s in form.states}
    body_names = [o.name for o in body.graph.output]
    total, fired = np.zeros((len(x), 3), np.float32), 0
    for _ in range(T):
        values = dict(zip(main_names, run_ort(main, {"x": x, **state}, main_names)))
        state = {s.input: values[s.output] for s in record.states}
        total = total + values[y_name]
        got = dict(zip(body_names, run_ort(body, {**boundary, **body_state})))
        body_state = {s.input: got[s.output] for s in form.states}
        for s in record.states:
            np.testing.assert_allclose(got[s.output], values[s.output], rtol=1e-5, atol=1e-5)
        for count, name in zip(form.spike_counts, spikes):
            expected = values[name].reshape(len(x), -1).sum(axis=1)
            np.testing.assert_array_equal(got[count.output], expected)
            fired += expected.sum()
    np.testing.assert_allclose(body_state[acc[0].input], total, rtol=1e-5, atol=1e-5)
    assert fired > 0 and np.abs(total).max() > 0
    EmbedRuntimeForm().ensures(out, record)


def test_ensures_catches_a_body_without_the_states():
    x = data()
    before = before_embedding(cnn(), x)
    result = EmbedRuntimeForm()(before.model, before.record)
    more = ConversionRecord(result.record.options, states=result.record.states * 3)
    with pytest.raises(ContractError, match="states"):
        EmbedRuntimeForm().ensures(result.model, more)


def test_a_model_with_no_neuron_gets_no_runtime_form(caplog):
    b = GraphBuilder(seed=1)
    model = b.model({"x": ["N", 4]}, [b.op("Gemm", ["x", b.rand(4, 3), b.rand(3)])])
    x = np.random.default_rng(0).random((8, 4)).astype(np.float32)
    before = before_embedding(model, x)
    assert before.record.states == [] and before.record.sites == []
    result = EmbedRuntimeForm()(before.model, before.record)
    assert result.modified is False
    assert result.model.SerializeToString() == before.model.SerializeToString()
    assert KEY_RUNTIME_FORM not in metadata(result.model.metadata_props)
    EmbedRuntimeForm().ensures(result.model, result.record)


def test_an_output_that_skips_every_neuron_gets_no_runtime_form():
    """A second output computed from the input alone does not depend on any state."""
    b = GraphBuilder(seed=2)
    z = b.op("Gemm", ["x", b.rand(4, 3), b.rand(3)])
    model = b.model({"x": ["N", 4]}, [b.op("Relu", [z]), b.op("Neg", [z])])
    x = np.random.default_rng(0).random((8, 4)).astype(np.float32)
    before = before_embedding(model, x)
    assert len(before.record.states) == 1
    result = EmbedRuntimeForm()(before.model, before.record)
    assert result.modified is False
    assert KEY_RUNTIME_FORM not in metadata(result.model.metadata_props)


def test_embedding_again_replaces_the_runtime_form():
    x = data()
    before = before_embedding(cnn(), x)
    once = EmbedRuntimeForm()(before.model, before.record)
    twice = EmbedRuntimeForm()(once.model, once.record)
    assert [p.key for p in twice.model.metadata_props].count(KEY_RUNTIME_FORM) == 1
    onnx.checker.check_model(twice.model)
