"""Serve a step model through Triton (PyTriton) and call it over HTTP and gRPC, whole and streaming.

    python examples/serve_and_call.py [--out DIR] [--http-port 8000] [--grpc-port 8001] [-v]

Needs the serve extra (scripts/setup.sh installs it). The server listens on loopback only.
"""
import argparse
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx_snn_runtime.datasets import load_fashion_mnist
from onnx_snn_runtime.serve import serve

import onnx_snn

ROOT = Path(__file__).resolve().parents[1]


def inputs(module, **values):
    types = {np.float32: "FP32", np.int32: "INT32", np.uint64: "UINT64", np.bool_: "BOOL"}
    result = []
    for name, value in values.items():
        i = module.InferInput(name, list(value.shape), types[value.dtype.type])
        i.set_data_from_numpy(value)
        result.append(i)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="example_output")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("-v", "--verbose", action="store_true", help="show Triton's and PyTriton's own log")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_train, _ = load_fashion_mnist("train", source="bundled")
    x_test, y_test = load_fashion_mnist("test", source="bundled")
    model = onnx_snn.save(onnx_snn.Converter(x_train, "99.9%", progress=False)(ROOT / "models" / "sample_cnn.onnx"),
                          out / "served.snn.onnx")

    triton = serve(model, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                   block=False, verbose=args.verbose)
    try:
        http = httpclient.InferenceServerClient(f"127.0.0.1:{args.http_port}")
        x = x_test[:8]
        r = http.infer("snn", inputs(httpclient, x=x, T=np.array([32], np.int32), last_only=np.array([True])))
        print("whole inference over HTTP, T=32: predictions", r.as_numpy("predictions")[-1], "labels", y_test[:8])

        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{args.grpc_port}")
        for t in range(32):  # one request per timestep; the server keeps the membrane potentials
            r = grpc.infer("snn_stream", inputs(grpcclient, sequence_id=np.array([42], np.uint64), x=x[:1],
                                                start=np.array([t == 0]), end=np.array([t == 31])))
        print(f"streaming over gRPC: after step {r.as_numpy('step')[0]} the prediction is "
              f"{r.as_numpy('predictions')[0]} (label {y_test[0]})")
    finally:
        triton.stop()


if __name__ == "__main__":
    main()
