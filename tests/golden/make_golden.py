"""Write the golden step models that ``tests/test_golden.py`` compares the converter against.

Made once, by the converter as it stood before the structural refactor of issue 12 (commit
2359cf7), so that the test proves the refactor changed no node and no weight. Re-run only for
a deliberate change of the converter's output, and say so in the commit:

    python tests/golden/make_golden.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# name -> (source model, converter options); calibration: the bundled slice's first 256 images
CASES = {
    "sample_cnn_999": ("sample_cnn.onnx", {"mode": "99.9%"}),
    # the preset's first recipe (no selection among its candidates: that would pin the choice too)
    "sample_cnn_preset_T8": ("sample_cnn.onnx", {"target_T": 8, "select_recipe": False}),
    "maxpool_cnn_running_max": ("maxpool_cnn.onnx", {"mode": "99.9%", "maxpool": "running_max"}),
    "maxpool_cnn_before_neuron": ("maxpool_cnn.onnx", {"mode": "99.9%", "maxpool": "before_neuron"}),
    "maxpool_cnn_plain": ("maxpool_cnn.onnx", {"mode": "99.9%", "maxpool": "plain"}),
}
CALIBRATION_IMAGES = 256


def calibration_images() -> np.ndarray:
    with np.load(ROOT / "models" / "data" / "fashion_mnist_subset.npz") as z:
        return z["x_calib"][:CALIBRATION_IMAGES].astype(np.float32)[:, None] / 255.0


def fingerprint(model: onnx.ModelProto) -> tuple[dict, dict[str, np.ndarray]]:
    """(nodes, graph I/O and the decoded metadata as JSON-able data, initializers by name)."""
    nodes = [{"op": n.op_type, "domain": n.domain, "name": n.name, "inputs": list(n.input),
              "outputs": list(n.output),
              "attributes": {a.name: repr(onnx.helper.get_attribute_value(a)) for a in n.attribute}}
             for n in model.graph.node]
    meta = {p.key: p.value for p in model.metadata_props}
    states = json.loads(meta["onnx_snn.states"])
    calibration = json.loads(meta["onnx_snn.calibration"])
    record = {"nodes": nodes, "inputs": [i.name for i in model.graph.input],
              "outputs": [o.name for o in model.graph.output], "states": states,
              "lambdas": [entry["lambda"] for entry in calibration["layers"]],
              "functions": [f.name for f in model.functions]}
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return record, weights


def convert(source: str, options: dict) -> onnx.ModelProto:
    import onnx_snn
    return onnx_snn.Converter(calibration_images(), progress=False, **options)(ROOT / "models" / source)


def main() -> int:
    for name, (source, options) in CASES.items():
        record, weights = fingerprint(convert(source, options))
        (HERE / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        np.savez_compressed(HERE / f"{name}.npz", **{f"w{i}": w for i, w in enumerate(weights.values())},
                            names=np.array(list(weights)))
        print(f"wrote {name}: {len(record['nodes'])} nodes, {len(weights)} initializers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
