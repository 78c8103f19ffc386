"""CUDA provider checks: skipped without a usable GPU. Run them on a lent GPU machine with
``pytest -q tests/test_cuda.py -s``; ``bench/runtime.py`` prints the matching timings."""
import numpy as np
import pytest
from onnx_snn_runtime import Simulator
from onnx_snn_runtime.providers import gpu_present

pytestmark = pytest.mark.skipif(not gpu_present(), reason="no GPU on this machine")


def test_cuda_with_and_without_graphs_gives_the_cpu_results(sample_snn, bundled):
    """Stated tolerance: cuDNN may pick convolution algorithms that round differently, so a neuron
    exactly at threshold can fire one step apart; accumulated outputs agree to 1e-3 relative and
    predictions after T steps on >= 99.5 % of the samples."""
    x = bundled[2][:256]
    cpu = Simulator(sample_snn, "cpu").run(x, 32)
    plain = Simulator(sample_snn, "cuda", cuda_graph=False)
    graph = Simulator(sample_snn, "cuda", cuda_graph=True)
    assert plain.provider == graph.provider == "CUDAExecutionProvider"
    assert graph.cuda_graph and graph.cuda_graph_status == "on"
    for sim in (plain, graph):
        out = sim.run(x, 32)
        scale = np.abs(cpu).max()
        print(sim.cuda_graph_status, "max |cuda - cpu| / max |cpu| =", np.abs(out - cpu).max() / scale,
              "prediction agreement at T:", (out[-1].argmax(-1) == cpu[-1].argmax(-1)).mean())
        assert (out[-1].argmax(-1) == cpu[-1].argmax(-1)).mean() >= 0.995
        assert np.abs(out[-1] - cpu[-1]).max() <= 1e-3 * scale * 32


def test_cuda_graph_partial_batches_and_repeated_batches(sample_snn, bundled):
    _, _, xt, yt = bundled
    graph = Simulator(sample_snn, "cuda", cuda_graph=True)
    plain = Simulator(sample_snn, "cuda", cuda_graph=False)
    a = graph.evaluate((xt[:300], yt[:300]), 20, batch_size=128, progress=False)  # 128, 128, 44 (padded)
    b = plain.evaluate((xt[:300], yt[:300]), 20, batch_size=128, progress=False)
    assert a.samples == b.samples == 300
    np.testing.assert_allclose(a.accuracy, b.accuracy, atol=2 / 300)
    first = graph.run(xt[:128], 10)
    graph.run(xt[128:256], 10)
    np.testing.assert_allclose(graph.run(xt[:128], 10), first, rtol=1e-6)  # no state leaks through the graph


@pytest.fixture(scope="module")
def cuda_kernels():
    """The CUDA kernel library (scripts/build_kernels_cuda.sh). Missing, the tests skip, except
    where ONNX_SNN_REQUIRE_CUDA_KERNELS is set (scripts/device_check.sh sets it)."""
    import os

    from onnx_snn_runtime import native
    if not native.available(cuda=True):
        if os.environ.get("ONNX_SNN_REQUIRE_CUDA_KERNELS"):
            pytest.fail(f"CUDA kernels not built ({native.CUDA_BUILD_HINT})")
        pytest.skip("CUDA kernels not built")
    return native.library(cuda=True)


def cuda_session(model, library):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=[("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"])
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    return session


@pytest.mark.parametrize("attrs", [{}, {"threshold": 0.37}, {"reset_mode": 1, "v_reset": -0.3}])
@pytest.mark.parametrize("op", ["IFNeuron", "IFNeuronSeq", "IFNeuronSeqConst"])
def test_cuda_kernels_equal_numpy(cuda_kernels, op, attrs):
    from test_if_neuron_seq import assert_same, feeds_for, op_model, reference
    session = cuda_session(op_model(op, tail=(3, 5, 7), **attrs), cuda_kernels)
    for n, k in ((1, 1), (5, 3), (300, 4)):
        feeds = feeds_for(op, n, k, tail=(3, 5, 7))
        assert_same(session.run(None, feeds), reference(op, feeds, **attrs))


@pytest.mark.parametrize("kernel", [[2, 2], [3, 3]])
@pytest.mark.parametrize("op", ["IFNeuronSeqAvgPool", "IFNeuronSeqConstAvgPool"])
def test_cuda_pooled_kernels_equal_numpy(cuda_kernels, op, kernel):
    from test_if_neuron_pool import feeds_for, pool_model, reference
    from test_if_neuron_seq import assert_same
    session = cuda_session(pool_model(op, kernel, chw=(4, 9, 11)), cuda_kernels)
    for n, k in ((1, 1), (5, 3), (70, 4)):
        feeds = feeds_for(op, n, k, chw=(4, 9, 11))
        assert_same(session.run(None, feeds), reference(op, feeds, kernel))


def test_cuda_chunks_with_native_kernels_give_the_step_loop(sample_snn, bundled, cuda_kernels):
    """Chunk execution on CUDA with the native kernels against the CUDA step loop (function
    bodies, no CUDA graphs), both unoptimized: the same convolutions on the same device."""
    x = bundled[2][:64]
    step = Simulator(sample_snn, "cuda", execution="step", kernels="onnx", cuda_graph=False, optimize=False)
    chunk = Simulator(sample_snn, "cuda", execution="chunk", kernels="native", optimize=False)
    a, b = step.run(x, 20), chunk.run(x, 20)
    print("chunk/native vs step on CUDA: max |diff|", np.abs(a - b).max(),
          "prediction agreement at every t:", (a.argmax(-1) == b.argmax(-1)).mean())
    assert (a[-1].argmax(-1) == b[-1].argmax(-1)).mean() >= 0.99
