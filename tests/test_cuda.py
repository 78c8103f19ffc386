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
