"""The converter's output is pinned: step models converted now have the same nodes, the same
weights, the same states and the same lambdas as those the converter wrote before the
structural refactor of issue 12 (``tests/golden/make_golden.py`` made them, at commit 2359cf7).
One model per MaxPool strategy and one with the target_T preset (bias and potential correction)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import make_golden  # noqa: E402


@pytest.mark.parametrize("name", sorted(make_golden.CASES))
def test_step_model_equals_the_golden_one(name):
    source, options = make_golden.CASES[name]
    record, weights = make_golden.fingerprint(make_golden.convert(source, options))
    golden = json.loads((make_golden.HERE / f"{name}.json").read_text())
    for key in golden:
        assert record[key] == golden[key], f"{name}: {key} differs from the golden step model"
    with np.load(make_golden.HERE / f"{name}.npz") as z:
        names = [str(n) for n in z["names"]]
        assert list(weights) == names
        for i, n in enumerate(names):
            np.testing.assert_array_equal(weights[n], z[f"w{i}"], err_msg=f"{name}: initializer {n}")
