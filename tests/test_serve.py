"""`onnx-snn serve`: the real tritonserver that PyTriton ships, started on loopback in a
subprocess, called with tritonclient over HTTP and gRPC. Results equal the local runtime's;
bad requests get clear errors while the server keeps serving; a bounded concurrent load."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT, SAMPLE_ONNX
from onnx_snn_runtime import Simulator
from onnx_snn_runtime.loop import simulate
from onnx_snn_runtime.providers import session

import onnx_snn

sys.path.insert(0, str(ROOT / "bench"))
from timing import status_mb  # noqa: E402 - bench/timing.py, the benchmarks' /proc reader

if os.environ.get("CI"):  # CI installs the serve extra: these tests must run there, not skip
    import pytriton  # noqa: F401
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
else:
    pytest.importorskip("pytriton")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    httpclient = pytest.importorskip("tritonclient.http")

MAX_SEQUENCES, IDLE, MAX_BATCH = 4, 4.0, 16
TYPES = {np.float32: "FP32", np.float64: "FP64", np.int32: "INT32", np.uint64: "UINT64", np.bool_: "BOOL"}


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def server(bundled, tmp_path_factory):
    model = tmp_path_factory.mktemp("serve") / "cnn.snn.onnx"
    onnx_snn.save(onnx_snn.Converter(bundled[0], "99.9%", progress=False)(SAMPLE_ONNX), model)
    http_port, grpc_port, metrics_port = free_ports(3)
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "onnx_snn", "serve", str(model), "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                             "--max-sequences", str(MAX_SEQUENCES), "--idle-timeout", str(IDLE), "--max-T", "200",
                             "--max-batch", str(MAX_BATCH)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    deadline = time.monotonic() + 120
    while True:
        try:
            if http.is_model_ready("snn") and http.is_model_ready("snn_stream"):
                break
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            pytest.fail(f"the server did not start:\n{log.read()[-3000:]}")
        time.sleep(0.5)
    yield {"model": model, "http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}", "proc": proc}
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def client(server, protocol):
    return (httpclient.InferenceServerClient(server["http"]) if protocol == "http"
            else grpcclient.InferenceServerClient(server["grpc"]))


def infer(c, model, protocol, **inputs):
    module = httpclient if protocol == "http" else grpcclient
    ins = []
    for name, value in inputs.items():
        value = np.asarray(value)
        i = module.InferInput(name, list(value.shape), TYPES[value.dtype.type])
        i.set_data_from_numpy(value)
        ins.append(i)
    return c.infer(model, ins)


def stream(c, protocol, sid, x, start=False, end=False):
    return infer(c, "snn_stream", protocol, sequence_id=np.array([sid], np.uint64), x=x,
                 start=np.array([start]), end=np.array([end]))


def local_stream(model, x, T):
    """What the server's streaming path computes: the whole step model in one session, looped."""
    return simulate(session(model.read_bytes(), "CPUExecutionProvider"), {"input": x}, T)["logits"]


def test_python_versions_pytriton_cannot_serve_are_refused_up_front():
    from onnx_snn_runtime.errors import OnnxSnnError
    from onnx_snn_runtime.serve import check_python
    check_python((3, 11, 2))
    check_python((3, 12, 1))
    with pytest.raises(OnnxSnnError, match="3.11.7.*Debian"):
        check_python((3, 11, 7))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_whole_inference_equals_the_local_runtime(server, bundled, protocol):
    x = bundled[2][:5]
    expected = Simulator(server["model"], "cpu").run(x, 12)
    out = infer(client(server, protocol), "snn", protocol, x=x, T=np.array([12], np.int32))
    np.testing.assert_array_equal(out.as_numpy("outputs"), expected)
    np.testing.assert_array_equal(out.as_numpy("predictions"), expected.argmax(-1))
    last = infer(client(server, protocol), "snn", protocol, x=x, T=np.array([12], np.int32),
                 last_only=np.array([True]))
    np.testing.assert_array_equal(last.as_numpy("outputs"), expected[-1:])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_interleaved_streams_keep_their_own_state(server, bundled, protocol):
    c = client(server, protocol)
    xa, xb = bundled[2][:2], bundled[2][10:13]
    ea, eb = local_stream(server["model"], xa, 6), local_stream(server["model"], xb, 6)
    sa, sb = (101 if protocol == "http" else 201), (102 if protocol == "http" else 202)
    for t in range(6):
        ra = stream(c, protocol, sa, xa, start=t == 0, end=t == 5)
        rb = stream(c, protocol, sb, xb, start=t == 0, end=t == 5)
        assert ra.as_numpy("step")[0] == t + 1 == rb.as_numpy("step")[0]
        np.testing.assert_allclose(ra.as_numpy("outputs"), ea[t], rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(rb.as_numpy("outputs"), eb[t], rtol=1e-6, atol=1e-5)
    with pytest.raises(Exception, match="unknown or expired"):  # ended with end=true
        stream(c, protocol, sa, xa)


def test_start_on_a_live_sequence_restarts_it(server, bundled):
    c, x = client(server, "http"), bundled[2][:1]
    first = stream(c, "http", 300, x, start=True).as_numpy("outputs")
    stream(c, "http", 300, x)
    again = stream(c, "http", 300, x, start=True, end=True)
    assert again.as_numpy("step")[0] == 1
    np.testing.assert_array_equal(again.as_numpy("outputs"), first)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case,match", [
    ("wrong_shape", "shape"),
    ("wrong_dtype", "data-type is 'FP64'"),
    ("missing_T", "missing required input"),
    ("T_two_values", "unexpected shape for input 'T'"),
    ("unknown_model", "not found"),
    ("T_zero", "out of range"),
    ("T_too_big", "out of range"),
    ("unknown_sequence", "unknown or expired"),
    ("batch_change", "started with a batch of 2"),
    ("batch_too_big", "over this server's limit of 16"),
    ("stream_batch_too_big", "over this server's limit of 16"),
    # PyTriton's own serialization refuses an empty tensor before onnx-snn's code sees it (its
    # message, not ours); what matters is that the server goes on serving
    ("empty_batch", "zeros in shape"),
])
def test_bad_requests_get_clear_errors_and_the_server_goes_on(server, bundled, protocol, case, match):
    c, x = client(server, protocol), bundled[2][:2]
    with pytest.raises(Exception, match=match):
        if case == "wrong_shape":
            infer(c, "snn", protocol, x=x[:, :, :20], T=np.array([3], np.int32))
        elif case == "wrong_dtype":
            infer(c, "snn", protocol, x=x.astype(np.float64), T=np.array([3], np.int32))
        elif case == "missing_T":
            infer(c, "snn", protocol, x=x)
        elif case == "T_two_values":
            infer(c, "snn", protocol, x=x, T=np.array([3, 4], np.int32))
        elif case == "unknown_model":
            infer(c, "no_such_model", protocol, x=x, T=np.array([3], np.int32))
        elif case == "T_zero":
            infer(c, "snn", protocol, x=x, T=np.array([0], np.int32))
        elif case == "T_too_big":
            infer(c, "snn", protocol, x=x, T=np.array([10_000], np.int32))
        elif case == "unknown_sequence":
            stream(c, protocol, 987654321, x)
        elif case == "batch_too_big":
            infer(c, "snn", protocol, x=np.repeat(x, 9, axis=0), T=np.array([2], np.int32))
        elif case == "stream_batch_too_big":
            stream(c, protocol, 401, np.repeat(x, 9, axis=0), start=True)
        elif case == "empty_batch":
            stream(c, protocol, 402, x[:0], start=True)
        elif case == "batch_change":
            stream(c, protocol, 400, x, start=True)
            try:
                stream(c, protocol, 400, x[:1])
            finally:
                stream(c, protocol, 400, x, end=True)
    ok = infer(c, "snn", protocol, x=x, T=np.array([2], np.int32))  # still serving
    assert ok.as_numpy("outputs").shape == (2, 2, 10)


def test_live_sequences_are_bounded_and_idle_ones_expire(server, bundled):
    c, x = client(server, "http"), bundled[2][:1]
    ids = list(range(500, 500 + MAX_SEQUENCES))
    for sid in ids:
        stream(c, "http", sid, x, start=True)
    with pytest.raises(Exception, match="too many live sequences"):
        stream(c, "http", 999, x, start=True)
    stream(c, "http", 997, x, start=True, end=True)  # a one-step sequence is never kept: allowed when full
    stream(c, "http", ids[0], x, end=True)  # ending one frees a place
    stream(c, "http", 999, x, start=True)
    time.sleep(IDLE + 1.0)
    with pytest.raises(Exception, match="unknown or expired"):
        stream(c, "http", ids[1], x)
    stream(c, "http", 998, x, start=True, end=True)  # the expired ones no longer count


def test_concurrent_clients_all_get_correct_answers(server, bundled):
    """A bounded load: clients in threads for about 4 s, each with its own sequences and whole
    requests; every response is checked against the local runtime."""
    xs = bundled[2][:4]
    T = 5
    expected_stream = {i: local_stream(server["model"], xs[i:i + 1], T) for i in range(len(xs))}
    expected_whole = Simulator(server["model"], "cpu").run(xs, T)
    failures, counts = [], []
    stop_at = time.monotonic() + 4.0

    def worker(k):
        protocol = "http" if k % 2 else "grpc"
        c = client(server, protocol)
        done = 0
        try:
            while time.monotonic() < stop_at and done < 200:
                i = k % len(xs)
                sid = 10_000 + 100 * k + done
                for t in range(T):
                    r = stream(c, protocol, sid, xs[i:i + 1], start=t == 0, end=t == T - 1)
                    if not np.allclose(r.as_numpy("outputs"), expected_stream[i][t], rtol=1e-6, atol=1e-5):
                        failures.append((k, sid, t))
                w = infer(c, "snn", protocol, x=xs, T=np.array([T], np.int32))
                if not np.array_equal(w.as_numpy("outputs"), expected_whole):
                    failures.append((k, "whole"))
                done += 1
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append((k, repr(e)[:300]))
        counts.append(done)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(MAX_SEQUENCES)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not failures, failures[:5]
    assert sum(counts) >= len(threads)  # every client got through at least one round


def test_server_memory_is_bounded_by_live_sequences_not_by_sequences_served(server, bundled):
    """2000 one-step sequences (start and end together) after a warm-up of 200: if the server kept
    any state per finished sequence (about 110 kB each for this model) it would grow by 200 MB."""
    c, x = client(server, "http"), bundled[2][:1]
    for sid in range(200):
        stream(c, "http", 50_000 + sid, x, start=True, end=True)
    before = status_mb(pid=server["proc"].pid)
    for sid in range(2000):
        r = stream(c, "http", 60_000 + sid, x, start=True, end=True)
        assert r.as_numpy("step")[0] == 1
    growth = status_mb(pid=server["proc"].pid) - before
    print(f"server RSS {before:.1f} MB before, growth {growth:+.1f} MB over 2000 finished sequences")
    assert growth < 40, f"server RSS grew {growth:.1f} MB over 2000 finished sequences"
