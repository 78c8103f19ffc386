"""`onnx-snn serve`: the real tritonserver that PyTriton ships, started on loopback in a
subprocess, called with tritonclient over HTTP and gRPC. Results equal the local runtime's;
bad requests get clear errors while the server keeps serving; a bounded concurrent load."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SAMPLE_ONNX
from onnx_snn_runtime import Simulator
from onnx_snn_runtime.loop import simulate
from onnx_snn_runtime.providers import session

import onnx_snn

sys.path.insert(0, str(ROOT / "bench"))
from timing import free_ports, status_mb  # noqa: E402 - bench/timing.py, shared with the benchmarks

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


@pytest.fixture(scope="module")
def server(bundled, tmp_path_factory):
    model = tmp_path_factory.mktemp("serve") / "cnn.snn.onnx"
    onnx_snn.save(onnx_snn.Converter(bundled[0], "99.9%", progress=False)(SAMPLE_ONNX), model)
    http_port, grpc_port, metrics_port = free_ports(3)
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "onnx_snn", "serve", str(model), "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                             "--max-sequences", str(MAX_SEQUENCES), "--idle-timeout", str(IDLE), "--max-T", "1000",
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
    yield {"model": model, "http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}", "proc": proc,
           "log": log, "metrics": metrics_port}
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
    # refused by Triton itself, before onnx-snn's code: already INVALID_ARGUMENT
    ("wrong_shape", "shape"),
    ("wrong_dtype", "data-type is 'FP64'"),
    ("missing_T", "missing required input"),
    ("T_two_values", "unexpected shape for input 'T'"),
    # refused by onnx-snn (ServeError, through STUB_PATCH)
    ("T_zero", "T=0 is out of range"),
    ("T_negative", "T=-3 is out of range"),
    ("T_huge", "T=1000000000 is out of range"),
    ("nan", "NaN or infinite values"),
    ("inf_stream", "NaN or infinite values"),
    ("unknown_sequence", "unknown or expired"),
    ("missing_sequence_id", "input 'sequence_id' is missing"),
    ("batch_change", "started with a batch of 2"),
    ("batch_too_big", "over this server's limit of 16"),
    ("stream_batch_too_big", "over this server's limit of 16"),
    ("empty_batch", "holds no values"),
    ("empty_stream_batch", "holds no values"),
])
def test_bad_requests_are_client_errors_in_one_line_and_the_server_goes_on(server, bundled, protocol, case, match):
    """INVALID_ARGUMENT (HTTP 400), one line naming the problem, no traceback or server path; one
    log line on the server for each request onnx-snn refused."""
    c, x = client(server, protocol), bundled[2][:2]
    log = server["log"]
    log.seek(0, os.SEEK_END)
    before = log.tell()
    with pytest.raises(Exception, match=match) as refused:
        if case == "wrong_shape":
            infer(c, "snn", protocol, x=x[:, :, :20], T=np.array([3], np.int32))
        elif case == "wrong_dtype":
            infer(c, "snn", protocol, x=x.astype(np.float64), T=np.array([3], np.int32))
        elif case == "missing_T":
            infer(c, "snn", protocol, x=x)
        elif case == "T_two_values":
            infer(c, "snn", protocol, x=x, T=np.array([3, 4], np.int32))
        elif case == "T_zero":
            infer(c, "snn", protocol, x=x, T=np.array([0], np.int32))
        elif case == "T_negative":
            infer(c, "snn", protocol, x=x, T=np.array([-3], np.int32))
        elif case == "T_huge":
            infer(c, "snn", protocol, x=x, T=np.array([10 ** 9], np.int32))
        elif case == "nan":
            bad = x.copy()
            bad[1, 0, 3, 3] = np.nan
            infer(c, "snn", protocol, x=bad, T=np.array([3], np.int32))
        elif case == "inf_stream":
            stream(c, protocol, 403, np.full_like(x, np.inf), start=True)
        elif case == "unknown_sequence":
            stream(c, protocol, 987654321, x)
        elif case == "missing_sequence_id":
            infer(c, "snn_stream", protocol, x=x, start=np.array([True]))
        elif case == "batch_too_big":
            infer(c, "snn", protocol, x=np.repeat(x, 9, axis=0), T=np.array([2], np.int32))
        elif case == "stream_batch_too_big":
            stream(c, protocol, 401, np.repeat(x, 9, axis=0), start=True)
        elif case == "empty_batch":
            infer(c, "snn", protocol, x=x[:0], T=np.array([2], np.int32))
        elif case == "empty_stream_batch":
            stream(c, protocol, 402, x[:0], start=True)
        elif case == "batch_change":
            stream(c, protocol, 400, x, start=True)
            try:
                stream(c, protocol, 400, x[:1])
            finally:
                stream(c, protocol, 400, x, end=True)
    error = refused.value
    status = error.status()
    assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (status, str(error))
    message = error.message()
    assert "\n" not in message and "Traceback" not in message and "/" not in message, message
    ok = infer(c, "snn", protocol, x=x, T=np.array([2], np.int32))  # still serving
    assert ok.as_numpy("outputs").shape == (2, 2, 10)
    log.seek(before)
    logged = log.read()
    assert "Traceback" not in logged, logged[-2000:]
    ours = case not in ("wrong_shape", "wrong_dtype", "missing_T", "T_two_values")
    if ours and case != "empty_stream_batch" and case != "empty_batch":
        assert logged.count("refused a request") == 1, logged[-2000:]


def test_metrics_answer_on_the_metrics_port(server):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10) as r:
        assert b"nv_inference_request_success" in r.read()


def test_a_small_request_is_not_queued_behind_a_long_one(server, bundled):
    """Two whole-inference instances: a 1-image T=2 request sent while a 16-image T=1000 one runs
    is answered before it (with one instance it waited for it to end)."""
    c_long, c_small = client(server, "http"), client(server, "grpc")
    x = bundled[2][:MAX_BATCH]
    finished = {}

    def long_request():
        infer(c_long, "snn", "http", x=x, T=np.array([1000], np.int32), last_only=np.array([True]))
        finished["long"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.3)
    infer(c_small, "snn", "grpc", x=x[:1], T=np.array([2], np.int32))
    finished["small"] = time.monotonic()
    thread.join(timeout=120)
    assert finished["small"] < finished["long"], finished


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


def serve_process(model, tmp_path, *extra):
    """`onnx-snn serve` in its own session, its temporary files under ``tmp_path``; returns the
    process, its ports and the seconds until it printed that it serves (the models ready then)."""
    http_port, grpc_port = free_ports(2)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "onnx_snn", "serve", str(model), "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True, env=env)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("serving "):
            break
        assert time.monotonic() < deadline, "".join(lines)
    else:
        pytest.fail("the server ended before serving:\n" + "".join(lines))
    return proc, http_port, grpc_port, lines


def live_processes(group: int) -> list[str]:
    """Processes of a process group that are not zombies (a container's init may not reap them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text()
        except OSError:
            continue
        state, _, pgid = fields[fields.rindex(")") + 2:].split()[:3]
        if int(pgid) == group and state != "Z":
            found.append(fields[:80])
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_cleanly_within_10_seconds(server, bundled, sig):
    """After traffic, with clients still connected: exit status 0 within 10 s, every child process
    gone, the ports free, no workspace and no shared memory left, no traceback; metrics off."""
    tmp_path = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short: Unix socket paths live in it
    shm_before = set(os.listdir("/dev/shm"))
    proc, http_port, grpc_port, lines = serve_process(server["model"], tmp_path, "--metrics-port", "0")
    assert "metrics off" in lines[-1]
    http = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    assert http.is_model_ready("snn") and http.is_model_ready("snn_stream")  # ready when it says so
    x = bundled[2][:2]
    infer(http, "snn", "http", x=x, T=np.array([5], np.int32))
    stream(grpc, "grpc", 7, x, start=True)
    with pytest.raises(Exception, match="out of range"):
        infer(grpc, "snn", "grpc", x=x, T=np.array([0], np.int32))
    start = time.monotonic()
    os.kill(proc.pid, sig)
    try:
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    took = time.monotonic() - start
    output = "".join(lines) + proc.stdout.read()
    assert rc == 0, output
    assert took < 10, f"stopping took {took:.1f} s"
    time.sleep(0.5)
    assert not live_processes(proc.pid), live_processes(proc.pid)
    for port in (http_port, grpc_port):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # free again
    # tritonserver keeps one 51-byte session file, .ses, in the temporary folder for all its runs
    assert not [f for f in tmp_path.iterdir() if f.name != ".ses"], list(tmp_path.iterdir())
    shutil.rmtree(tmp_path)
    assert not set(os.listdir("/dev/shm")) - shm_before
    for noise in ("Traceback", "leaked", "exited with failure", "Exit timeout"):
        assert noise not in output, output
    assert output.rstrip().endswith("stopped")


def test_a_port_in_use_is_refused_before_start_naming_it(server):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "onnx_snn", "serve", str(server["model"]),
                                 "--grpc-port", str(port), "--http-port", str(free_ports(1)[0])],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use (--grpc-port {port})" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert time.monotonic() - start < 30  # refused up front, not after Triton's start-up


def test_a_long_temporary_folder_gives_way_to_tmp_for_socket_paths(tmp_path, monkeypatch):
    from onnx_snn_runtime import serve as serve_module
    from onnx_snn_runtime.errors import OnnxSnnError
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    folder = serve_module._workspace("snn")
    try:
        assert Path(folder).parent == Path("/tmp")
    finally:
        os.rmdir(folder)
    with pytest.raises(OnnxSnnError, match="too long for the server's Unix socket paths"):
        serve_module._workspace("m" * 120)
