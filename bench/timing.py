"""What the benchmarks share: the timing options of vs_spikingjelly.py and dense_limit.py, the
images each batch size is timed on, the stopwatch, and memory figures from /proc."""
from __future__ import annotations

import argparse
import socket
import time

import numpy as np


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--T", type=int, default=50)
    parser.add_argument("--batches", default="1,100,1000")
    parser.add_argument("--images", type=int, default=1000, help="test images per timing at batch > 1")
    parser.add_argument("--batch1-images", type=int, default=50, help="test images per timing at batch 1")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every simulator")
    parser.add_argument("--repeats", type=int, default=3, help="timings per figure; the best is kept")
    parser.add_argument("--execution", default="auto", choices=("auto", "chunk", "step"),
                        help="the simulator's execution (default auto: the fastest available)")
    parser.add_argument("--kernels", default="auto", choices=("auto", "native", "onnx"),
                        help="the simulator's neuron kernels (default auto); step + onnx is the path before issue 13")


def timed_images(x: np.ndarray, batch: int, args: argparse.Namespace) -> np.ndarray:
    """Batch 1 is timed on fewer images (it is slow for SpikingJelly); others on at least one batch."""
    return x[: args.batch1_images if batch == 1 else max(batch, args.images)]


def seconds(run) -> float:
    """Wall time of one call of ``run``."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def status_mb(field: str = "VmRSS", pid: int | str = "self") -> float:
    """A memory figure of a process from /proc/<pid>/status, in MB (VmRSS; VmHWM = peak RSS)."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on loopback now (for servers started by benchmarks and tests)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
