"""Latency of `onnx-snn serve` under mixed load: small requests beside long ones (issue 16).

    python bench/serve_load.py [--configs 1x2,2x1,2x2] [--small-T 20] [--large-T 1000] [--large-batch 64]
                               [--requests 40] [--json bench/results/serve_load.json]

For each of ``--configs`` (I x N: I whole-inference instances of N CPU threads each), one
`onnx-snn serve` process on loopback (the committed sample
CNN, converted with ``99.9%``), then, with tritonclient over HTTP:

1. solo: ``--requests`` small whole-inference requests (1 image, ``--small-T``) one after another,
   then 3 large ones (``--large-batch`` images, ``--large-T``), alone;
2. mixed: a client sending large requests back to back in a thread while another sends the
   ``--requests`` small ones, 50 ms apart.

It prints p50 and p99 latency per request size and phase, and the small requests' p99 under
mixed load over their solo p50 (target: at most 3x). Every loop is bounded; all servers are
run in one invocation, so the ratios between them are side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tritonclient.http as httpclient  # noqa: E402
from onnx_snn_runtime.datasets import load_fashion_mnist  # noqa: E402

import onnx_snn  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from timing import free_ports  # noqa: E402


def start_server(model: Path, instances: int, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    http_port, grpc_port = free_ports(2)
    proc = subprocess.Popen([sys.executable, "-m", "onnx_snn", "serve", str(model), "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port), "--metrics-port", "0", "--instances", str(instances),
                             "--threads", str(threads), "--max-batch", str(max_batch)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        if line.startswith("serving "):
            break
        if time.monotonic() > deadline:
            break
    if proc.poll() is not None:
        raise SystemExit(f"the server did not start (exit {proc.returncode})")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain its output
    url = f"127.0.0.1:{http_port}"
    client = httpclient.InferenceServerClient(url)
    while not client.is_model_ready("snn"):  # it says "serving" once ready: this only confirms it
        if time.monotonic() > deadline:
            raise SystemExit("the server did not get ready")
        time.sleep(0.2)
    return proc, url


def request(client, x: np.ndarray, T: int) -> float:
    inputs = [httpclient.InferInput("x", list(x.shape), "FP32"), httpclient.InferInput("T", [1], "INT32"),
              httpclient.InferInput("last_only", [1], "BOOL")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(np.array([T], np.int32))
    inputs[2].set_data_from_numpy(np.array([True]))
    start = time.perf_counter()
    client.infer("snn", inputs)
    return time.perf_counter() - start


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "n": len(values)}


def measure(url: str, x: np.ndarray, args) -> dict:
    small, large = x[:1], x[: args.large_batch]
    c = httpclient.InferenceServerClient(url, network_timeout=600)
    for _ in range(3):  # warm-up
        request(c, small, args.small_T)
    request(c, large, args.large_T)
    result = {"solo small": percentiles([request(c, small, args.small_T) for _ in range(args.requests)]),
              "solo large": percentiles([request(c, large, args.large_T) for _ in range(3)])}
    stop, large_times = threading.Event(), []

    def large_loop():
        c_large = httpclient.InferenceServerClient(url, network_timeout=600)
        while not stop.is_set() and len(large_times) < 1000:
            large_times.append(request(c_large, large, args.large_T))

    thread = threading.Thread(target=large_loop)
    thread.start()
    time.sleep(0.2)
    small_times = []
    for _ in range(args.requests):
        small_times.append(request(c, small, args.small_T))
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=600)
    result["mixed small"], result["mixed large"] = percentiles(small_times), percentiles(large_times)
    result["small p99 mixed / p50 solo"] = result["mixed small"]["p99"] / result["solo small"]["p50"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=f"1x{os.cpu_count()},2x{max(1, os.cpu_count() // 2)},2x{os.cpu_count()}",
                        help="servers measured, each INSTANCESxTHREADS (default: 1 instance with every core, 2 "
                             "sharing them, 2 with every core each)")
    parser.add_argument("--small-T", type=int, default=20)
    parser.add_argument("--large-T", type=int, default=1000)
    parser.add_argument("--large-batch", type=int, default=64)
    parser.add_argument("--requests", type=int, default=40, help="small requests per phase")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    x_train, _ = load_fashion_mnist("train", source="bundled")
    x_test, _ = load_fashion_mnist("test", source="bundled")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "cnn.snn.onnx"
        onnx_snn.save(onnx_snn.Converter(x_train, "99.9%", progress=False)(ROOT / "models" / "sample_cnn.onnx"), model)
        results = {}
        for config in args.configs.split(","):
            instances, threads = (int(v) for v in config.split("x"))
            proc, url = start_server(model, instances, threads, max(256, args.large_batch))
            try:
                results[config] = measure(url, x_test, args)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    print(f"small: 1 image, T={args.small_T}; large: {args.large_batch} images, T={args.large_T}; "
          f"{args.requests} small requests per phase; {machine}")
    print("| instances x threads | solo small p50 / p99 | mixed small p50 / p99 | mixed small p99 / solo p50 | "
          "solo large p50 | mixed large p50 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for config, r in results.items():
        print(f"| {config} | {r['solo small']['p50'] * 1e3:.0f} / {r['solo small']['p99'] * 1e3:.0f} ms | "
              f"{r['mixed small']['p50'] * 1e3:.0f} / {r['mixed small']['p99'] * 1e3:.0f} ms | "
              f"{r['small p99 mixed / p50 solo']:.1f}x | {r['solo large']['p50']:.2f} s | "
              f"{r['mixed large']['p50']:.2f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
