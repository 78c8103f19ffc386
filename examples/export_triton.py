"""Write a Triton model repository for a step model (onnxruntime backend, implicit state).

    python examples/export_triton.py [--out DIR]
"""
import argparse
from pathlib import Path

from onnx_snn_runtime.datasets import load_fashion_mnist

import onnx_snn
from onnx_snn.triton_export import export_triton

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="example_output")
    args = parser.parse_args()
    repo = Path(args.out) / "triton_repo"
    repo.mkdir(parents=True, exist_ok=True)
    x_train, _ = load_fashion_mnist("train", source="bundled")
    snn = onnx_snn.Converter(x_train, target_T=16, progress=False)(ROOT / "models" / "sample_cnn.onnx")
    path = export_triton(snn, repo, name="sample_cnn", force=True)
    print(f"wrote {path}; run it with: tritonserver --model-repository {repo.resolve()}")
    print("\n".join((path / "config.pbtxt").read_text().splitlines()[:12]))


if __name__ == "__main__":
    main()
