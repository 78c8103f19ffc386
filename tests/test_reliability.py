"""Long runs and threads: memory stays flat while streaming, and simulators in threads give the
sequential results (docs/runtime.md says what is thread-safe)."""
import sys
import threading

import numpy as np
from conftest import ROOT
from onnx_snn_runtime import Simulator

sys.path.insert(0, str(ROOT / "bench"))
from long_run import stream  # noqa: E402


def test_streaming_memory_is_flat_after_warm_up(sample_snn, bundled):
    """A short version of bench/long_run.py (which runs 100 000 steps): after 500 warm-up steps,
    3000 more steps of Simulator.step may not grow the resident set by more than 2 MB."""
    sim = Simulator(sample_snn, "cpu")
    samples = stream(sim, bundled[2][:50], 3500, 1000, 500, report=lambda _: None)
    growth = samples[-1][1] - samples[0][1]
    assert growth <= 2.0, samples


def test_simulators_in_threads_give_the_sequential_results(sample_snn, bundled):
    chunks = [bundled[2][i * 16:(i + 1) * 16] for i in range(4)]
    expected = [Simulator(sample_snn, "cpu").run(c, 12, firing=True) for c in chunks]
    results, errors = [None] * len(chunks), []

    def work(i):
        try:
            sim = Simulator(sample_snn, "cpu")  # one per thread: a Simulator owns its states
            for _ in range(5):
                results[i] = sim.run(chunks[i], 12, firing=True)
                sim.reset()
                for _ in range(3):
                    sim.step(chunks[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(chunks))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors
    for (out, counts), (exp_out, exp_counts) in zip(results, expected):
        np.testing.assert_array_equal(out, exp_out)
        for layer in exp_counts:
            np.testing.assert_array_equal(counts[layer], exp_counts[layer])
