"""The fuzz harness (bench/fuzz.py) in CI: a small fixed budget of mutated models and data through
load -> convert -> one step, where only the project's errors may come out; and every failure the
long runs found, kept as a regression case."""
import re
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import fuzz  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")

# The checks that now refuse a malformed source first: onnxruntime's own load, strict shape
# inference, or the fold's channel checks (whichever comes first for that model)
EARLY = "onnxruntime cannot run|inconsistent|malformed"

# Found by bench/fuzz.py, each a failure before its fix (the outcome was "failure"):
REGRESSIONS = {
    # a node name that is not UTF-8: protobuf hands back bytes, graphsurgeon crashed exporting it
    "name not UTF-8": (0, 0.5, [("bytes", 194, 998, 0.0)], "not UTF-8"),
    # Conv weights with 4 output channels before a BatchNorm of 32: numpy broadcast error
    "BatchNorm wider than its Conv": (1, "99.9%", [("input_dim", 9649, 2506, 0.0), ("opset", 206, 427, 0.0),
                                                   ("initializer_shape", 100, 2753, 0.0)], EARLY),
    # a Conv bias of 3 values for 32 channels: numpy broadcast error in the BatchNorm fold
    "Conv bias of the wrong length": (1, "search", [("initializer_shape", 33, 237, 0.0),
                                                   ("initializer_dtype", 514, 577, 0.0)], EARLY),
    # declared output shape [N, 3] against an inferred [N, 1]: onnx.checker failed in WriteStepModel
    "declared shape contradicted": (0, "max", [("initializer_shape", 109, 295, 0.0)], "shapes are inconsistent"),
    # a Gemm fed a rank-4 tensor after an edge moved: onnx.checker failed in WriteStepModel
    "op input of the wrong rank": (1, 0.5, [("edge", 727, 126, 0.0), ("edge", 40, 10000, 0.0)], EARLY),
    # a weight of 1e30: activations near 1e30, and folding the scale into the next weights overflowed
    # float32 to inf, so the SNN's outputs were NaN (now: the Mul is kept, outputs finite)
    "scale folding overflows": (0, "99.9%", [("initializer_values", 1579, 597, 0.0),
                                           ("initializer_values", 1745, 597, -1e6), ("bytes", 308, 7832, -0.5)], None),
    # a Conv whose bias became a non-constant tensor: AttributeError in the BatchNorm fold
    "Conv bias not constant": (1, "max", [("edge", 4586, 1994, 0.0), ("edge", 6475, 3003, 0.0)], ""),
    # Conv weights cut to one output channel, so the Gemm after it no longer fits: onnxruntime
    # refused the session inside Calibrate (a PassError, "a bug in onnx-snn")
    "onnxruntime refuses the model": (0, "max", [("initializer_shape", 0, 0, 0.0)], "onnxruntime cannot run|inconsistent"),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_fuzz_regression(name):
    which, mode, mutations, message = REGRESSIONS[name]
    outcome, detail = fuzz.run_case(which, mode, mutations, timeout=60)
    if message is None:  # converts and runs now
        assert outcome == "ok", detail
        return
    assert outcome == "refused", detail
    assert re.search(message, detail), detail  # the fix that refuses it first may be an earlier check


def test_fuzz_small_budget_only_project_errors():
    from hypothesis import HealthCheck, given, seed, settings
    which_s, mode_s, mutations_s = fuzz.strategies()
    failures = []

    @seed(20261128)
    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(which_s, mode_s, mutations_s)
    def case(which, mode, mutations):
        outcome, detail = fuzz.run_case(which, mode, mutations, timeout=60)
        if outcome == "failure":
            failures.append((which, mode, mutations, detail[:300]))

    case()
    assert not failures, failures[:3]
