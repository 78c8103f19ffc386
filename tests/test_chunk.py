"""Chunk execution (K steps per onnxruntime call) computes what the step loop computes, spike
for spike and output for output (``optimize=False``): with native kernels, with the function
bodies, on every committed model, both reset modes, every MaxPool strategy, K not dividing T,
chunks interleaved with single steps, odd shapes and an empty batch."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_builder import GraphBuilder
from onnx_snn_runtime import Simulator, native
from onnx_snn_runtime.format import KEY_RUNTIME_FORM, RuntimeForm
from onnx_snn_runtime.native import KernelsError
from onnx_snn_runtime.simulator import ACTIVATIONS_PER_NEURON

import onnx_snn
from onnx_snn import chunk

MODELS = {  # name -> (source, converter options)
    "sample_cnn": ("sample_cnn.onnx", {"mode": "99.9%"}),
    "sample_cnn_zero_reset": ("sample_cnn.onnx", {"mode": "99.9%", "reset_mode": "zero", "v_init": "half"}),
    "sample_cnn_preset_T8": ("sample_cnn.onnx", {"target_T": 8}),
    "maxpool_running_max": ("maxpool_cnn.onnx", {"maxpool": "running_max"}),
    "maxpool_before_neuron": ("maxpool_cnn.onnx", {"maxpool": "before_neuron"}),
    "maxpool_plain": ("maxpool_cnn.onnx", {"maxpool": "plain", "reset_mode": "zero"}),
    "resnet20": ("resnet20.onnx", {"mode": "99.9%"}),
    "vgg8": ("vgg8.onnx", {"mode": "99.9%", "fold_scales": False}),
}
T = 11
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


def odd_model() -> onnx.ModelProto:
    """Odd sizes everywhere, and a prefix output that feeds both a neuron and a residual Add (so
    the chunk repeats it with Tile besides reading it once in IFNeuronSeqConst)."""
    b = GraphBuilder(seed=3)
    c1 = b.op("Conv", ["x", b.rand(5, 3, 3, 3), b.rand(5)], pads=[1, 1, 1, 1])
    r1 = b.op("Relu", [c1])
    c2 = b.op("Conv", [r1, b.rand(5, 5, 3, 3), b.rand(5)], pads=[1, 1, 1, 1])
    r2 = b.op("Relu", [b.op("Add", [c2, c1])])
    pooled = b.op("AveragePool", [r2], kernel_shape=[2, 2], strides=[2, 2])
    flat = b.op("Flatten", [pooled])
    r3 = b.op("Relu", [b.op("Gemm", [flat, b.rand(6, 5 * 3 * 2), b.rand(6)], transB=1)])
    b.op("Gemm", [r3, b.rand(3, 6), b.rand(3)], transB=1)
    return b.model({"x": ["N", 3, 7, 5]}, [b.nodes[-1].output[0]])


@pytest.fixture(scope="module")
def converted(bundled, tmp_path_factory):
    root = tmp_path_factory.mktemp("chunk")
    paths = {}
    for name, (source, options) in MODELS.items():
        paths[name] = root / f"{name}.snn.onnx"
        onnx_snn.save(onnx_snn.Converter(bundled[0][:128], progress=False, **options)(MODELS_DIR / source), paths[name])
    x = np.random.default_rng(0).uniform(0, 1, (64, 3, 7, 5)).astype(np.float32)
    paths["odd"] = root / "odd.snn.onnx"
    onnx_snn.save(onnx_snn.Converter(x, progress=False)(odd_model()), paths["odd"])
    return paths


def images(path, bundled, n):
    sim = Simulator(path, "cpu", execution="step", kernels="onnx")
    shape = sim.inputs[0][1]
    if shape[1:] == [1, 28, 28]:
        return bundled[2][:n]
    return np.random.default_rng(1).uniform(0, 1, (n, *shape[1:])).astype(np.float32)


def simulators(path, K=None, n=1):
    """The step loop with function bodies (the reference), then every other combination."""
    kinds = [("step", "onnx"), ("chunk", "onnx")]
    if native.available():
        kinds += [("chunk", "native"), ("step", "native")]
    sims = []
    for execution, kernels in kinds:
        sim = Simulator(path, "cpu", execution=execution, kernels=kernels, optimize=False)
        if K is not None:  # a budget that gives exactly K steps per chunk for n samples
            sim.chunk_memory = K * max(n, 1) * sim._membrane_bytes_per_sample * ACTIVATIONS_PER_NEURON
        sims.append(sim)
    return sims


@pytest.mark.parametrize("name", [*MODELS, "odd"])
def test_chunked_equals_step_loop(converted, bundled, name):
    x = images(converted[name], bundled, 5)
    reference, *others = simulators(converted[name], K=4, n=len(x))
    want, want_rates = reference.run(x, T, firing=True)
    assert sum(v.sum() for v in want_rates.values()) > 0
    for sim in others:
        if sim.execution == "chunk":
            assert sim.chunk_steps(len(x), T) == 4  # 4 + 4 + 3: K does not divide T
        got, rates = sim.run(x, T, firing=True)
        np.testing.assert_array_equal(got, want, err_msg=f"{sim.execution}/{sim.kernels}")
        assert rates.keys() == want_rates.keys()
        for layer in rates:
            np.testing.assert_array_equal(rates[layer], want_rates[layer], err_msg=f"{sim.execution}/{sim.kernels} {layer}")


@pytest.mark.parametrize("name", ["sample_cnn", "maxpool_running_max", "odd"])
def test_chunks_and_single_steps_interleave(converted, bundled, name):
    x = images(converted[name], bundled, 3)
    want = simulators(converted[name])[0].run(x, 9)
    for sim in simulators(converted[name]):
        got = [sim.step(x, steps=3), sim.step(x), sim.step(x, steps=4), sim.step(x)]
        for value, t in zip(got, (3, 4, 8, 9)):
            np.testing.assert_array_equal(value, want[t - 1], err_msg=f"{sim.execution}/{sim.kernels} t={t}")


def test_empty_batch(converted, bundled):
    x = images(converted["maxpool_running_max"], bundled, 1)[:0]
    results = [sim.run(x, 5, firing=True) for sim in simulators(converted["maxpool_running_max"])]
    for out, rates in results:
        assert out.shape == results[0][0].shape == (5, 0, 10)
        assert {k: v.shape for k, v in rates.items()} == {k: (5, 0) for k in results[0][1]}


def test_final_output_only_and_evaluate_agree(converted, bundled):
    path = converted["sample_cnn"]
    x = bundled[2][:6]
    step_sim, chunk_sim = simulators(path, K=3, n=6)[:2]
    np.testing.assert_array_equal(chunk_sim.run(x, 7, per_step=False), step_sim.run(x, 7)[-1])
    data = (bundled[2][:20], bundled[3][:20])
    a = step_sim.evaluate(data, 7, batch_size=8, progress=False)
    b = chunk_sim.evaluate(data, 7, batch_size=8, progress=False)
    np.testing.assert_array_equal(a.accuracy, b.accuracy)
    for layer in a.firing_rates:
        np.testing.assert_array_equal(a.firing_rates[layer], b.firing_rates[layer])


def test_memory_budget_bounds_k(converted):
    sim = Simulator(converted["sample_cnn"], "cpu", execution="chunk", kernels="onnx")
    per_step = sim._membrane_bytes_per_sample * ACTIVATIONS_PER_NEURON
    assert sim.chunk_steps(100, 1000) == max(1, sim.chunk_memory // (100 * per_step))
    assert sim.chunk_steps(1, 4) == 4
    sim.chunk_memory = 1
    assert sim.chunk_steps(1000, 1000) == 1


def test_every_step_model_gets_a_chunk_model_that_the_converter_checked(converted):
    for name, path in converted.items():
        model = onnx.load(path)
        form = RuntimeForm.from_json(next(p.value for p in model.metadata_props if p.key == KEY_RUNTIME_FORM))
        assert form.chunk is not None, name
        ops = {n.op_type for n in onnx.load_from_string(form.chunk).graph.node if n.domain == "onnx_snn"}
        assert ops <= set(chunk.SEQUENCE_OPS) and ops & {"IFNeuronSeqConst", "IFNeuronSeqConstAvgPool"}, name
        if name.startswith("sample_cnn"):  # Conv-ReLU-AvgPool: every layer fused
            assert ops == {"IFNeuronSeqConstAvgPool", "IFNeuronSeqAvgPool"}, name
        assert chunk.check_chunk(form.chunk, form.body, form.boundary, form.states, steps=4) is None


def test_check_chunk_catches_a_wrong_chunk(converted):
    model = onnx.load(converted["sample_cnn"])
    form = RuntimeForm.from_json(next(p.value for p in model.metadata_props if p.key == KEY_RUNTIME_FORM))
    wrong = onnx.load_from_string(form.chunk)
    seq = next(n for n in wrong.graph.node if n.op_type == "IFNeuronSeqAvgPool")
    threshold = next(a for a in seq.attribute if a.name == "threshold")
    threshold.f = 0.9
    reason = chunk.check_chunk(wrong.SerializeToString(), form.body, form.boundary, form.states)
    assert reason and "differs" in reason


def test_auto_picks_chunks_on_the_cpu_with_native_kernels_when_built(converted, bundled, monkeypatch):
    path = converted["sample_cnn"]
    if native.available():
        sim = Simulator(path, "cpu")
        assert (sim.kernels, sim.execution) == ("native", "chunk")
    assert Simulator(path, "cpu", runtime_form=False).execution == "step"  # no chunk model to run
    monkeypatch.setenv(native.ENV, "")  # the library is absent: the function bodies, same numbers
    sim = Simulator(path, "cpu", optimize=False)
    assert (sim.kernels, sim.execution) == ("onnx", "chunk")
    x = bundled[2][:4]
    np.testing.assert_array_equal(sim.run(x, 6), Simulator(path, "cpu", execution="step", optimize=False).run(x, 6))
    with pytest.raises(KernelsError, match="build_kernels.sh"):
        Simulator(path, "cpu", kernels="native")


def test_bad_execution_options(converted):
    path = converted["sample_cnn"]
    with pytest.raises(onnx_snn.OnnxSnnError, match="execution='fast'"):
        Simulator(path, "cpu", execution="fast")
    with pytest.raises(onnx_snn.OnnxSnnError, match="kernels="):
        Simulator(path, "cpu", kernels="cuda")
    with pytest.raises(onnx_snn.OnnxSnnError, match="chunk model"):
        Simulator(path, "cpu", execution="chunk", runtime_form=False)
    with pytest.raises(onnx_snn.OnnxSnnError, match="chunk_memory"):
        Simulator(path, "cpu", chunk_memory=0)
    with pytest.raises(onnx_snn.OnnxSnnError, match="T="):
        Simulator(path, "cpu", execution="chunk", kernels="onnx").step(np.zeros((1, 1, 28, 28), np.float32), steps=0)


def test_small_batches_run_on_one_thread(converted):
    sim = Simulator(converted["sample_cnn"], "cpu", threads=2, execution="chunk", kernels="onnx")
    assert sim._engine._session_for(1).get_session_options().intra_op_num_threads == 1
    assert sim._engine._session_for(16).get_session_options().intra_op_num_threads == 1
    assert sim._engine._session_for(17).get_session_options().intra_op_num_threads == 2
