"""PlaceMaxPool with each strategy, and the running max's graph change (maxpool.running_max).

Every strategy turns a GlobalMaxPool over static dims into a whole-plane MaxPool;
``before_neuron`` swaps ReLU/Clip -> MaxPool into MaxPool -> ReLU/Clip where the neuron feeds
the pool alone; ``running_max`` and ``plain`` leave MaxPools to ``InsertNeurons``. The running
max's per-step outputs add up to the MaxPool of the summed input."""
import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx_builder import GraphBuilder
from onnx_snn_runtime.format import MAXPOOL_SUM, MEMBRANE, State

from onnx_snn.errors import OptionError
from onnx_snn.graph import export_model, import_graph
from onnx_snn.maxpool import STRATEGIES
from onnx_snn.maxpool.before_neuron import can_swap
from onnx_snn.maxpool.running_max import running_max
from onnx_snn.options import ConvertOptions
from onnx_snn.passes.base import ContractError
from onnx_snn.passes.canonicalize import Canonicalize
from onnx_snn.passes.maxpool import PlaceMaxPool
from onnx_snn.record import ConversionRecord, RunningMaxPool

RTOL, ATOL = 1e-5, 1e-6
X = np.random.default_rng(11).standard_normal((2, 2, 8, 8)).astype(np.float32)


def ops(model):
    return [n.op_type for n in model.graph.node]


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def canonical(b, outputs, shape=("N", 2, 8, 8)):
    return Canonicalize()(b.model({"x": list(shape)}, outputs)).model


def assert_same_function(a, b, x=X):
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    for got, want in zip(run_ort(a, {"x": x}), run_ort(b, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def conv_relu_pool(neuron="Relu", **pool):
    """x -> Conv -> Relu/Clip(0, 1) -> MaxPool -> Flatten: returns (model, neuron name, pool name)."""
    b = GraphBuilder()
    h = b.op("Conv", ["x", b.rand(3, 2, 3, 3), b.rand(3)], pads=[1, 1, 1, 1])
    h = b.op("Relu", [h]) if neuron == "Relu" else b.op("Clip", [h, b.const(np.float32(0)), b.const(np.float32(1))])
    y = b.op("Flatten", [b.op("MaxPool", [h], **(pool or dict(kernel_shape=[2, 2], strides=[2, 2])))])
    model = canonical(b, [y])
    return model, model.graph.node[1].name, model.graph.node[2].name


# ---------------------------------------------------------------------------------------- GlobalMaxPool

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_static_global_maxpool_becomes_a_whole_plane_maxpool(strategy):
    b = GraphBuilder()
    conv = b.op("Conv", ["x", b.rand(3, 2, 3, 3)])
    y = b.op("Flatten", [b.op("GlobalMaxPool", [b.op("Neg", [conv])])])  # not after a neuron: no swap
    model = canonical(b, [y])
    pool_name = model.graph.node[2].name
    result = PlaceMaxPool(strategy)(model)
    out = result.model
    assert result.modified is True
    assert "GlobalMaxPool" not in ops(out)
    pool = node(out, pool_name)  # same node, same name
    assert pool.op_type == "MaxPool"
    assert [(a.name, list(a.ints)) for a in pool.attribute] == [("kernel_shape", [6, 6])]
    assert result.record.swapped_maxpools == []
    assert_same_function(out, model)
    PlaceMaxPool(strategy).ensures(out, result.record)


def test_global_maxpool_after_relu_is_globalized_then_swapped_before_neuron():
    b = GraphBuilder()
    relu = b.op("Relu", [b.op("Conv", ["x", b.rand(3, 2, 3, 3)])])
    y = b.op("Flatten", [b.op("GlobalMaxPool", [relu])])
    model = canonical(b, [y])
    relu_name, pool_name = model.graph.node[1].name, model.graph.node[2].name
    result = PlaceMaxPool("before_neuron")(model)
    assert ops(result.model) == ["Conv", "MaxPool", "Relu", "Flatten"]
    assert result.record.swapped_maxpools == [pool_name]
    assert node(result.model, relu_name).input[0] == node(result.model, pool_name).output[0]
    assert_same_function(result.model, model)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dynamic_global_maxpool_stays(strategy):
    b = GraphBuilder()
    y = b.op("GlobalMaxPool", [b.op("Relu", [b.op("Conv", ["x", b.rand(3, 2, 3, 3)])])])
    model = canonical(b, [y], shape=("N", 2, "H", "W"))
    original = model.SerializeToString()
    result = PlaceMaxPool(strategy)(model)
    assert result.modified is False
    assert result.model.SerializeToString() == original
    assert result.record.swapped_maxpools == []
    PlaceMaxPool(strategy).ensures(result.model, result.record)


# ---------------------------------------------------------------------------------------- before_neuron

@pytest.mark.parametrize("neuron", ["Relu", "Clip"])
@pytest.mark.parametrize("pool", [dict(kernel_shape=[2, 2], strides=[2, 2]),
                                  dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])])
def test_before_neuron_swaps_neuron_and_maxpool(neuron, pool):
    model, neuron_name, pool_name = conv_relu_pool(neuron, **pool)
    conv_out = model.graph.node[0].output[0]
    flatten_in = model.graph.node[3].input[0]
    result = PlaceMaxPool("before_neuron")(model)
    out = result.model
    assert result.modified is True
    assert ops(out) == ["Conv", "MaxPool", neuron, "Flatten"]
    new_pool, new_neuron = node(out, pool_name), node(out, neuron_name)
    assert new_pool.input[0] == conv_out  # the pool now reads the Conv ...
    assert new_neuron.input[0] == new_pool.output[0]  # ... the neuron reads the pool ...
    assert new_neuron.output[0] == flatten_in  # ... and the Flatten reads the neuron, as it read the pool
    assert list(new_neuron.input[1:]) == list(node(model, neuron_name).input[1:])  # Clip keeps its bounds
    assert result.record.swapped_maxpools == [pool_name]
    assert_same_function(out, model)
    PlaceMaxPool("before_neuron").ensures(out, result.record)
    onnx.checker.check_model(out)


def test_before_neuron_swaps_a_chain_of_pools():
    b = GraphBuilder()
    relu = b.op("Relu", [b.op("Conv", ["x", b.rand(3, 2, 3, 3)], pads=[1, 1, 1, 1])])
    p1 = b.op("MaxPool", [relu], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("MaxPool", [p1], kernel_shape=[2, 2], strides=[2, 2])
    model = canonical(b, [y])
    pools = [n.name for n in model.graph.node if n.op_type == "MaxPool"]
    result = PlaceMaxPool("before_neuron")(model)
    assert ops(result.model) == ["Conv", "MaxPool", "MaxPool", "Relu"]
    assert result.record.swapped_maxpools == pools
    assert result.model.graph.output[0].name == y
    assert_same_function(result.model, model)


@pytest.mark.parametrize("case", ["two_readers", "neuron_is_output", "not_after_neuron"])
def test_before_neuron_declines_with_a_reason(case):
    b = GraphBuilder()
    conv = b.op("Conv", ["x", b.rand(3, 2, 3, 3)], pads=[1, 1, 1, 1])
    relu = b.op("Relu", [conv])
    pool = b.op("MaxPool", [relu if case != "not_after_neuron" else conv], kernel_shape=[2, 2], strides=[2, 2])
    outputs = {"two_readers": [pool, b.op("Neg", [relu])], "neuron_is_output": [pool, relu],
               "not_after_neuron": [pool, relu]}[case]
    model = canonical(b, outputs)
    graph = import_graph(model)
    check = can_swap(graph, next(n for n in graph.nodes if n.op == "MaxPool"))
    assert not check
    assert check.reason == ("its input does not come from a ReLU or Clip" if case == "not_after_neuron"
                            else "the neuron's output has other readers")
    original = model.SerializeToString()
    result = PlaceMaxPool("before_neuron")(model)
    assert result.modified is False
    assert result.model.SerializeToString() == original
    assert result.record.swapped_maxpools == []
    PlaceMaxPool("before_neuron").ensures(result.model, result.record)


def test_input_record_is_not_changed():
    model, _, pool_name = conv_relu_pool()
    record = ConversionRecord(swapped_maxpools=["earlier"])
    result = PlaceMaxPool("before_neuron")(model, record)
    assert result.record.swapped_maxpools == ["earlier", pool_name]
    assert record.swapped_maxpools == ["earlier"]


# ---------------------------------------------------------------------------------------- running_max, plain

@pytest.mark.parametrize("strategy", ["running_max", "plain"])
def test_other_strategies_leave_maxpool_after_neuron(strategy):
    model, _, _ = conv_relu_pool()
    original = model.SerializeToString()
    result = PlaceMaxPool(strategy)(model)
    assert result.modified is False
    assert result.model.SerializeToString() == original
    assert result.record == ConversionRecord()
    PlaceMaxPool(strategy).ensures(result.model, result.record)


# ---------------------------------------------------------------------------------------- ensures, options

def test_ensures_catches_an_unswapped_pool_and_a_static_global_maxpool():
    model, _, _ = conv_relu_pool()
    with pytest.raises(ContractError, match="still follows its neuron"):
        PlaceMaxPool("before_neuron").ensures(model, ConversionRecord())
    PlaceMaxPool("running_max").ensures(model, ConversionRecord())  # fine for the others
    b = GraphBuilder()
    glob = canonical(b, [b.op("GlobalMaxPool", ["x"])])
    for strategy in STRATEGIES:
        with pytest.raises(ContractError, match="GlobalMaxPool"):
            PlaceMaxPool(strategy).ensures(glob, ConversionRecord())


def test_strategy_from_options_or_name():
    assert PlaceMaxPool(ConvertOptions(maxpool="before_neuron")).strategy.name == "before_neuron"
    assert PlaceMaxPool().strategy.name == "running_max"
    assert PlaceMaxPool("plain").strategy.name == "plain"
    with pytest.raises(OptionError, match="maxpool='nope'"):
        PlaceMaxPool("nope")


# ---------------------------------------------------------------------------------------- the running max

def pool_model(**attrs):
    b = GraphBuilder()
    y = b.op("MaxPool", ["x"], **attrs)
    return b.model({"x": ["N", 3, 7, 7]}, [y])


def with_running_max(model, record=None):
    """The model with its MaxPool(s) replaced by the running max, and the record."""
    record = record or ConversionRecord()
    graph = import_graph(model)
    for pool in [n for n in graph.nodes if n.op == "MaxPool"]:
        running_max(graph, pool, record)
    return export_model(graph, model), record


def run_steps(step_model, xs, state_in="snn.m0", state_out="snn.m0.next"):
    """Per-step outputs of the step model over the inputs ``xs``, the state starting at 0."""
    names = [o.name for o in step_model.graph.output]
    m = np.zeros_like(xs[0])
    ys = []
    for x in xs:
        y, m = run_ort(step_model, {"x": x, state_in: m}, outputs=[names[0], state_out])
        ys.append(y)
    return np.stack(ys), m


POOLS = [dict(kernel_shape=[2, 2], strides=[2, 2]), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
         dict(kernel_shape=[3, 3], strides=[1, 1]), dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
         dict(kernel_shape=[7, 7])]


@pytest.mark.parametrize("attrs", POOLS, ids=[str(p) for p in POOLS])
def test_running_max_outputs_add_up_to_maxpool_of_the_summed_input(attrs):
    model = pool_model(**attrs)
    step, record = with_running_max(model)
    rng = np.random.default_rng(1)
    T = 8
    xs = [np.abs(rng.standard_normal((2, 3, 7, 7))).astype(np.float32) * rng.random((2, 3, 7, 7)).astype(np.float32)
          for _ in range(T)]
    ys, m = run_steps(step, xs)
    total = np.zeros_like(xs[0])
    for x in xs:
        total += x  # the order the graph accumulates in
    np.testing.assert_array_equal(m, total)  # the state is the running sum
    want, = run_ort(model, {"x": total})
    np.testing.assert_allclose(ys.sum(0), want, rtol=RTOL, atol=1e-5)
    assert (ys >= 0).all()  # a max of a growing sum never decreases
    per_step, = run_ort(model, {"x": xs[0]})  # the first step is the plain MaxPool of the first input
    np.testing.assert_allclose(ys[0], per_step, rtol=RTOL, atol=ATOL)
    assert not np.allclose(ys.sum(0), sum(run_ort(model, {"x": x})[0] for x in xs))  # unlike a per-step max


def test_running_max_on_spikes_emits_spikes():
    model = pool_model(kernel_shape=[2, 2], strides=[2, 2])
    step, _ = with_running_max(model)
    lam, rng = np.float32(0.37), np.random.default_rng(2)
    xs = [lam * (rng.random((2, 3, 7, 7)) < 0.4).astype(np.float32) for _ in range(10)]
    ys, _ = run_steps(step, xs)
    spikes = np.isclose(ys, lam, atol=1e-5)
    assert (spikes | np.isclose(ys, 0, atol=1e-5)).all()
    counts = sum(x / lam for x in xs)
    np.testing.assert_array_equal(spikes.sum(0), run_ort(model, {"x": counts.astype(np.float32)})[0])


def test_running_max_graph_change_and_record():
    model = pool_model(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], storage_order=0)
    pool = model.graph.node[0]
    earlier = State("snn.v0", "snn.v0.next", [None, 4], "float32", MEMBRANE, "relu", 0.0)
    step, record = with_running_max(model, ConversionRecord(states=[earlier]))
    base = f"snn.{pool.name}"
    names = [f"{base}.accumulate", f"{base}.pool_before", f"{base}.pool_after", f"{base}.increase"]
    assert sorted(n.name for n in step.graph.node) == sorted(names)
    assert pool.name not in {n.name for n in step.graph.node}
    by_name = {n.name: n for n in step.graph.node}
    assert [by_name[n].op_type for n in names] == ["Add", "MaxPool", "MaxPool", "Sub"]
    for n in names[1:3]:  # the pooling attributes, without storage_order
        assert {a.name for a in by_name[n].attribute} == {"kernel_shape", "strides", "pads"}
    assert by_name[names[3]].output[0] == pool.output[0] == step.graph.output[0].name
    assert [i.name for i in step.graph.input] == ["x", "snn.m0"]  # k counts maxpool sums only
    assert [o.name for o in step.graph.output] == [pool.output[0], "snn.m0.next"]
    state = State("snn.m0", "snn.m0.next", [None, 3, 7, 7], "float32", MAXPOOL_SUM, pool.name, 0.0)
    assert record.states == [earlier, state]
    assert record.running_max == [RunningMaxPool(pool.name, names, state)]


def test_two_running_max_pools_get_their_own_states():
    b = GraphBuilder()
    p1 = b.op("MaxPool", ["x"], kernel_shape=[2, 2], strides=[1, 1])
    y = b.op("MaxPool", [p1], kernel_shape=[2, 2], strides=[2, 2])
    model = Canonicalize()(b.model({"x": ["N", 3, 7, 7]}, [y])).model  # shapes inferred for the states
    pools = [n.name for n in model.graph.node]
    step, record = with_running_max(model)
    assert [s.input for s in record.states] == ["snn.m0", "snn.m1"]
    assert [s.layer for s in record.states] == pools
    assert [s.shape for s in record.states] == [[None, 3, 7, 7], [None, 3, 6, 6]]
    rng = np.random.default_rng(4)
    xs = [rng.random((1, 3, 7, 7)).astype(np.float32) for _ in range(5)]
    m0, m1 = np.zeros((1, 3, 7, 7), np.float32), np.zeros((1, 3, 6, 6), np.float32)
    y_name = model.graph.output[0].name
    assert step.graph.output[0].name == y_name
    total_y = 0
    for x in xs:
        y, m0, m1 = run_ort(step, {"x": x, "snn.m0": m0, "snn.m1": m1}, outputs=[y_name, "snn.m0.next", "snn.m1.next"])
        total_y = total_y + y
    want, = run_ort(model, {"x": sum(xs)})
    np.testing.assert_allclose(total_y, want, rtol=RTOL, atol=1e-5)
