"""The dense limit: SNN simulation time against T x the ANN's inference time.

    python bench/dense_limit.py [--model sample_cnn] [--Ts 4,8,50] [--batches 1,100,1000] [--images 1000]
                                [--batch1-images 50] [--threads 2] [--repeats 3] [--execution ...] [--kernels ...]

The ANN (``models/<model>.onnx``) and the converted SNN (mode 99.9%) run through onnxruntime
sessions with the same options (``onnx_snn_runtime.providers.session``: CPU provider, the
same intra-op threads, full graph optimisation) at the same batch size over the same test
images. The ratio SNN time / (T x ANN time) is the headline figure: 1.0 means the SNN costs
as much as running the ANN T times. Timings are the best of ``--repeats``, ANN and SNN
alternating in one process. The last column is the process's peak resident memory after
that row: it should not grow with T (the simulator runs in chunks bounded by ``chunk_memory``).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_snn_runtime import Simulator  # noqa: E402
from onnx_snn_runtime.datasets import load_fashion_mnist  # noqa: E402
from onnx_snn_runtime.providers import session  # noqa: E402
from timing import add_timing_args, seconds, status_mb, timed_images  # noqa: E402

import onnx_snn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sample_cnn")
    parser.add_argument("--Ts", default=None, help="several T, comma-separated (default: --T)")
    add_timing_args(parser)
    args = parser.parse_args()
    source = ROOT / "models" / f"{args.model}.onnx"
    x_train, _ = load_fashion_mnist("train")
    x_test, _ = load_fashion_mnist("test")
    snn = onnx_snn.Converter(x_train[:5000], "99.9%", progress=False)(source)
    sim = Simulator(snn.SerializeToString(), "cpu", threads=args.threads, execution=args.execution,
                    kernels=args.kernels)
    ann = session(source.read_bytes(), "CPUExecutionProvider", threads=args.threads)
    name = ann.get_inputs()[0].name
    Ts = [int(t) for t in (args.Ts or str(args.T)).split(",")]
    print(f"{date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.threads} threads; "
          f"onnxruntime {ort.__version__}; {args.model}, 99.9%; simulator: {sim.execution} execution, "
          f"{sim.kernels} kernels")
    print(f"{'T':>5} {'batch':>6} {'ANN ms/image':>13} {'SNN ms/image':>13} {'SNN / (T x ANN)':>16} {'peak RSS MB':>12}")
    for T in Ts:
        for batch in map(int, args.batches.split(",")):
            xs = timed_images(x_test, batch, args)
            chunks = [xs[s:s + batch] for s in range(0, len(xs), batch)]
            ann_s, snn_s = np.inf, np.inf
            for _ in range(args.repeats):  # alternate, keep the best of each
                ann_s = min(ann_s, seconds(lambda: [ann.run(None, {name: c}) for c in chunks]))
                snn_s = min(snn_s, seconds(lambda: [sim.run(c, T, per_step=False) for c in chunks]))
            print(f"{T:5d} {batch:6d} {1e3 * ann_s / len(xs):13.4f} {1e3 * snn_s / len(xs):13.4f} "
                  f"{snn_s / (T * ann_s):15.2f}x {status_mb('VmHWM'):12.0f}", flush=True)


if __name__ == "__main__":
    main()
