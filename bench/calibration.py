"""Calibration time and peak memory: onnx-snn's 99.9% against SpikingJelly 2.0's, beside one
ANN inference pass over the same data.

    python bench/calibration.py [--model sample_cnn] [--sizes 10000,60000] [--batch-size 256] [--threads 2]

Each measurement runs in a fresh child process (so peak memory is its own): the training
images are loaded first, then the job runs, and the child reports the job's wall time and its
peak resident memory above what it held before the job (VmHWM, reset after loading, minus
VmRSS then). Jobs: ``ann`` (one onnxruntime inference pass over the images, the yardstick),
``ours`` (``onnx_snn.Converter(images, "99.9%")`` on the ONNX model: every pass, calibration
included) and ``sj`` (SpikingJelly's ``FXConverter`` with ``RateCodingRecipe(mode="99.9%")`` on
the torch model). Needs ``bash scripts/setup_bench.sh`` for ``sj``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

from timing import status_mb  # noqa: E402


def reset_peak() -> None:
    """Start VmHWM afresh from the current RSS (Linux >= 4.0), so loading the data is not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(job: str, model: str, size: int, batch: int, threads: int) -> dict:
    import numpy as np
    from onnx_snn_runtime.datasets import load_fashion_mnist
    x = np.ascontiguousarray(load_fashion_mnist("train")[0][:size])
    source = ROOT / "models" / f"{model}.onnx"
    if job == "ann":
        from onnx_snn_runtime.providers import session
        ann = session(source.read_bytes(), "CPUExecutionProvider", threads=threads)
        name = ann.get_inputs()[0].name
        run = lambda: [ann.run(None, {name: x[s:s + batch]}) for s in range(0, len(x), batch)]  # noqa: E731
    elif job == "ours":
        import onnxruntime as ort

        import onnx_snn
        ort.set_default_logger_severity(3)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        run = lambda: onnx_snn.Converter(x, "99.9%", batch_size=batch, progress=False)(source)  # noqa: E731
    else:
        import copy

        import torch
        from spikingjelly.activation_based import ann2snn
        from zoo import load_trained
        torch.set_num_threads(threads)
        ann = load_trained(model)
        loader = torch.utils.data.DataLoader(torch.from_numpy(x), batch_size=batch)
        run = lambda: ann2snn.FXConverter(  # noqa: E731
            recipe=ann2snn.RateCodingRecipe(loader, mode="99.9%"), device="cpu").convert(copy.deepcopy(ann))
    reset_peak()
    before = status_mb("VmRSS")
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_above_data_mb": status_mb("VmHWM") - before, "data_mb": x.nbytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sample_cnn")
    parser.add_argument("--sizes", default="10000,60000", help="numbers of training images")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", default="ann,ours,sj")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.size, args.batch_size, args.threads)))
        return
    import onnxruntime as ort
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.threads} threads; onnxruntime "
          f"{ort.__version__}; {args.model}, batch {args.batch_size}")
    print(f"{'images':>7} {'job':>5} {'seconds':>8} {'x ANN pass':>10} {'peak MB above data':>19}")
    for size in map(int, args.sizes.split(",")):
        ann_seconds = None
        for job in args.jobs.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", job, "--size", str(size), "--model", args.model,
                                  "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            ann_seconds = result["seconds"] if job == "ann" else ann_seconds
            ratio = f"{result['seconds'] / ann_seconds:9.2f}x" if ann_seconds else f"{'':>10}"
            print(f"{size:7d} {job:>5} {result['seconds']:8.2f} {ratio} {result['peak_above_data_mb']:19.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
