"""Fuzz load -> convert -> one simulation step with mutated models and calibration data.

    python bench/fuzz.py [--cases 2000] [--seconds 0] [--timeout 20] [--seed 0]

Each case takes a valid model (the sample CNN or a small built one) and calibration array,
applies a list of mutations that hypothesis draws (dims, attributes, op types, edges,
initializers, raw bytes; and the data's shape, dtype and values), and runs
``onnx_snn.Converter(data, mode)(model)`` then ``Simulator(...).run(x, 1)``. The only exceptions
allowed are the project's (``OnnxSnnError``) other than ``PassError`` (the pass manager's
wrapper for an unexpected exception inside a pass, "a bug in onnx-snn"); anything else is a
failure, and so is a case past ``--timeout`` seconds (a hang), or non-finite outputs from a
model the converter accepted. Prints the cases tried, the distinct outcomes reached (outcome
kind x error class x failing pass x message head: a proxy for the paths exercised) and every
failure with its mutation list, which reproduces it. tests/test_fuzz.py runs a small fixed
budget of the same harness in CI, and keeps each failure found as a regression case.
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "runtime"))

from onnx_snn_runtime import Simulator  # noqa: E402

import onnx_snn  # noqa: E402
from onnx_snn.errors import OnnxSnnError, PassError  # noqa: E402

OPS = ["Relu", "Sigmoid", "Conv", "Gemm", "MatMul", "Add", "Mul", "AveragePool", "MaxPool", "Flatten",
       "Reshape", "Clip", "BatchNormalization", "Softmax", "Identity", "Concat", "Transpose", "Unknown"]
MODES = ["max", "99.9%", 0.5, "search"]
MUTATIONS = ("input_dim", "attribute", "op_type", "edge", "initializer_shape", "initializer_values",
             "initializer_dtype", "drop_node", "opset", "bytes")


class CaseTimeout(BaseException):
    """A BaseException, so that code catching Exception inside the converter cannot absorb it."""


@contextmanager
def time_limit(seconds: float):
    """Raise CaseTimeout after ``seconds`` (Unix). Signals reach the main thread only: elsewhere
    the case runs without a limit. A hang inside C code that never returns to Python is not
    interrupted either; the run's total time then shows it."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"no result after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def small_model() -> onnx.ModelProto:
    """Conv-ReLU-AvgPool-Gemm-ReLU-Gemm on [N, 1, 8, 8]: small enough for many cases a second."""
    rng = np.random.default_rng(0)
    init = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("AveragePool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p1"], ["f1"], name="flat"),
             helper.make_node("Gemm", ["f1", "w2", "b2"], ["g1"], name="fc1", transB=1),
             helper.make_node("Relu", ["g1"], ["r2"], name="relu2"),
             helper.make_node("Gemm", ["r2", "w3"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", 1, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, ["N", 3])],
                              [init("w1", 4, 1, 3, 3), init("b1", 4), init("w2", 6, 64), init("b2", 6), init("w3", 3, 6)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def base_case(which: int):
    if which == 0:
        return small_model(), np.random.default_rng(1).random((24, 1, 8, 8)).astype(np.float32)
    x = np.random.default_rng(2).random((16, 1, 28, 28)).astype(np.float32)
    return onnx.load(ROOT / "models" / "sample_cnn.onnx"), x


def apply(model: onnx.ModelProto, data: np.ndarray, mutations: list[tuple]) -> tuple[bytes, np.ndarray]:
    """The mutated model (serialized: the byte mutation works on bytes) and data."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    raw_flips = []
    for kind, a, b, f in mutations:
        try:
            data = _mutate(m, g, data, raw_flips, kind, a, b, f)
        except (ValueError, TypeError, OverflowError, IndexError):
            pass  # a mutation that does not apply to this model (e.g. NaN into an int tensor): skip it
    blob = bytearray(m.SerializeToString())
    for a, b in raw_flips:
        if blob:
            blob[a % len(blob)] = b % 256
    return bytes(blob), data


def _mutate(m, g, data, raw_flips, kind, a, b, f):
    """Apply one mutation to model ``m`` (graph ``g``) in place; returns the (maybe new) data."""
    if True:
        nodes = list(g.node)
        if kind == "input_dim" and g.input and g.input[0].type.tensor_type.shape.dim:
            dims = g.input[0].type.tensor_type.shape.dim
            d = dims[a % len(dims)]
            d.Clear()
            d.dim_value = b % 40
        elif kind == "attribute" and nodes:
            node = nodes[a % len(nodes)]
            if node.attribute:
                attr = node.attribute[b % len(node.attribute)]
                if attr.type == onnx.AttributeProto.INTS:
                    attr.ints[:] = [int(v) for v in np.resize(np.array([b % 7 - 1, a % 5]), max(len(attr.ints), 1))]
                elif attr.type == onnx.AttributeProto.INT:
                    attr.i = b % 9 - 2
                elif attr.type == onnx.AttributeProto.FLOAT:
                    attr.f = f
        elif kind == "op_type" and nodes:
            nodes[a % len(nodes)].op_type = OPS[b % len(OPS)]
        elif kind == "edge" and nodes:
            names = [i for n in nodes for i in n.input] + [o for n in nodes for o in n.output] + ["ghost"]
            node = nodes[a % len(nodes)]
            if node.input:
                node.input[b % len(node.input)] = names[(a * 7 + b) % len(names)]
        elif kind == "initializer_shape" and g.initializer:
            t = g.initializer[a % len(g.initializer)]
            array = numpy_helper.to_array(t)
            new = np.resize(array, [max(1, (b % 5) + 1)] + list(array.shape[1:]))
            t.CopyFrom(numpy_helper.from_array(new.astype(array.dtype), t.name))
        elif kind == "initializer_values" and g.initializer:
            t = g.initializer[a % len(g.initializer)]
            array = numpy_helper.to_array(t).copy()
            if array.size:
                array.flat[b % array.size] = [np.nan, np.inf, -np.inf, 1e30, 0.0, f][b % 6]
            t.CopyFrom(numpy_helper.from_array(array, t.name))
        elif kind == "initializer_dtype" and g.initializer:
            t = g.initializer[a % len(g.initializer)]
            array = numpy_helper.to_array(t)
            dtype = [np.float16, np.float64, np.int64, np.int32][b % 4]
            t.CopyFrom(numpy_helper.from_array(array.astype(dtype), t.name))
        elif kind == "drop_node" and nodes:
            del g.node[a % len(nodes)]
        elif kind == "opset":
            m.opset_import[0].version = [1, 7, 12, 13, 15, 18, 21, 26, 27, 40][b % 10]
        elif kind == "bytes":
            raw_flips.append((a, b))
        elif kind == "data_shape":
            data = np.resize(data, [max(0, b % 30)] + list(data.shape[1:]))
        elif kind == "data_rank":
            data = data.reshape(data.shape[0], -1) if b % 2 else data[..., None]
        elif kind == "data_dtype":
            data = data.astype([np.float16, np.float64, np.int32, np.uint8, np.bool_][b % 5])
        elif kind == "data_values":
            data = data.copy()
            if data.size:
                data.flat[a % data.size] = [np.nan, np.inf, 1e30, -5.0, f][b % 5]
    return data


def run_case(which: int, mode, mutations: list[tuple], timeout: float = 20.0) -> tuple[str, str]:
    """(outcome, detail): outcome "ok", "refused" (a project error) or "failure"."""
    model, data = base_case(which)
    blob, data = apply(model, data, mutations)
    try:
        with time_limit(timeout):
            snn = onnx_snn.Converter(data, mode, target_T=4 if mode == "search" else None, progress=False)(blob)
            sim = Simulator(snn.SerializeToString(), "cpu", threads=1)
            out = sim.run(data[:2] if len(data) else data, 1)
            if not np.isfinite(out).all():
                return "failure", "non-finite output from a model the converter accepted"
        return "ok", ""
    except PassError as e:  # a pass hit something unexpected: the manager calls that a bug of ours
        return "failure", f"{type(e).__name__}: {e}"
    except OnnxSnnError as e:
        return "refused", f"{type(e).__name__}: {e}"
    except CaseTimeout as e:
        return "failure", f"hang: {e}"
    except Exception as e:  # noqa: BLE001 - exactly what the fuzzer looks for
        return "failure", f"{type(e).__name__}: {e}"


def signature(outcome: str, detail: str) -> str:
    """Outcome x error class x failing pass x the message's first words (digits and names folded)."""
    head = re.sub(r"'[^']*'|\"[^\"]*\"|\b[0-9][0-9.e+-]*", "_", detail)[:60]
    return f"{outcome} | {head}"


def strategies():
    from hypothesis import strategies as st
    mutation = st.tuples(st.sampled_from(MUTATIONS + ("data_shape", "data_rank", "data_dtype", "data_values")),
                         st.integers(0, 10_000), st.integers(0, 10_000),
                         st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))
    return st.integers(0, 1), st.sampled_from(MODES), st.lists(mutation, min_size=1, max_size=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: only --cases)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import logging
    logging.disable(logging.WARNING)
    from hypothesis import HealthCheck, given, seed, settings
    which_s, mode_s, mutations_s = strategies()
    outcomes, signatures, failures = Counter(), Counter(), []
    start = time.monotonic()

    @seed(args.seed)
    @settings(max_examples=args.cases, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(which_s, mode_s, mutations_s)
    def case(which, mode, mutations):
        if args.seconds and time.monotonic() - start > args.seconds:
            return
        outcome, detail = run_case(which, mode, mutations, args.timeout)
        outcomes[outcome] += 1
        signatures[signature(outcome, detail)] += 1
        if outcome == "failure":
            failures.append((which, mode, mutations, detail))

    case()
    tried = sum(outcomes.values())
    print(f"cases tried: {tried} in {time.monotonic() - start:.0f} s; ok {outcomes['ok']}, refused with a project "
          f"error {outcomes['refused']}, failures {outcomes['failure']}")
    print(f"distinct outcomes (kind x error x message head): {len(signatures)}")
    for sig, n in signatures.most_common(15):
        print(f"  {n:5d}  {sig}")
    for which, mode, mutations, detail in failures[:20]:
        print(f"FAILURE base={which} mode={mode!r} mutations={mutations}\n   {detail[:300]}")


if __name__ == "__main__":
    main()
