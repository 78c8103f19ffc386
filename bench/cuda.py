"""The GPU variant of vs_spikingjelly.py and dense_limit.py, for a lent GPU machine.

    python bench/cuda.py [--T 50] [--batch 1024] [--batch1-images 20] [--repeats 3]

On one GPU, the sample CNN converted with 99.9%:

* onnx-snn on onnxruntime's CUDA provider, with and without CUDA graphs: per-timestep latency
  at batch 1 and images x timesteps per second at batch ``--batch``;
* SpikingJelly 2.0 on the same card, built as in vs_spikingjelly.py from the same weights and
  lambdas, in both its step modes: single-step ('s', one call per timestep, as its ann2snn
  examples run) and multi-step ('m', all T steps in one call, stateless layers on [T*N, ...]
  and its fused CUDA IF kernel); the faster is SpikingJelly's figure;
* the dense limit: our SNN's time against T x the ANN's on the same provider and batch.

Also the share of the batch's images whose prediction after every t is the same as
SpikingJelly's. Both sides compute in float32 (TF32 off). Needs onnxruntime-gpu, torch with CUDA and SpikingJelly (see
scripts/device_check.sh, which runs this).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

from onnx_snn_runtime import Simulator  # noqa: E402
from onnx_snn_runtime.datasets import load_fashion_mnist  # noqa: E402
from onnx_snn_runtime.providers import session  # noqa: E402
from timing import seconds  # noqa: E402
from vs_spikingjelly import spikingjelly_snn  # noqa: E402

import onnx_snn  # noqa: E402


def best_seconds(run, repeats: int, sync=lambda: None) -> float:
    """Best of ``repeats`` timings of ``run`` then ``sync``, after one warm-up (cuDNN autotuning,
    CUDA graph capture, kernel compilation)."""
    run()
    sync()
    return min(seconds(lambda: (run(), sync())) for _ in range(repeats))


def multi_step(net):
    """The same network in SpikingJelly's multi-step mode: stateless layers see [T*N, ...]."""
    import torch
    from spikingjelly.activation_based import functional, layer, neuron
    from spikingjelly.activation_based.ann2snn.modules import VoltageScaler
    modules = [m if isinstance(m, (neuron.BaseNode, VoltageScaler)) else layer.SeqToANNContainer(m) for m in net]
    seq = torch.nn.Sequential(*modules)
    functional.set_step_mode(seq, "m")
    return seq


def sj_predictions(net, x, T: int, mode: str):
    """[T, N] predictions after every t (running sum of the outputs), on the GPU."""
    import torch
    from spikingjelly.activation_based import functional
    functional.reset_net(net)
    with torch.no_grad():
        if mode == "m":
            out = net(x.unsqueeze(0).expand(T, *x.shape))
            return out.cumsum(0).argmax(-1)
        total, preds = None, []
        for _ in range(T):
            out = net(x)
            total = out if total is None else total + out
            preds.append(total.argmax(1))
        return torch.stack(preds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--batch1-images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch
    from spikingjelly.activation_based.functional import neuron_implementation
    # float32 on both sides, as on the CPU: onnx-snn's CUDA sessions turn TF32 off too
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    T, N = args.T, args.batch
    dev = torch.device("cuda")
    x_train, _ = load_fashion_mnist("train")
    x_test, _ = load_fashion_mnist("test")
    big = np.concatenate([x_test] * (N // len(x_test) + 1))[:N]
    ones = x_test[: args.batch1_images]
    source = ROOT / "models" / "sample_cnn.onnx"
    converter = onnx_snn.Converter(x_train[:5000], "99.9%", progress=False)
    snn = converter(source).SerializeToString()
    try:
        kernel = neuron_implementation("if", dev)["implementation"]
    except (RuntimeError, ValueError) as e:
        kernel = f"none ({e})"
    print(f"device: {torch.cuda.get_device_name()}; onnxruntime {ort.__version__}, torch {torch.__version__}; "
          f"SpikingJelly IF kernel: {kernel}; sample CNN, 99.9%, T={T}")

    def simulators():
        """Fresh ones per batch size: with CUDA graphs a simulator keeps its first batch size."""
        sims = {graph: Simulator(snn, "cuda", cuda_graph=graph) for graph in (False, True)}
        for graph, sim in sims.items():
            if sim.provider != "CUDAExecutionProvider" or sim.cuda_graph != graph:
                print(f"warning: asked for CUDA graphs={graph}, got {sim.provider} with {sim.cuda_graph_status}")
        return sims
    sj_s = spikingjelly_snn([e["lambda"] for e in converter.report]).to(dev)
    sj_m = multi_step(spikingjelly_snn([e["lambda"] for e in converter.report])).to(dev)
    sync = torch.cuda.synchronize

    ours_pred = simulators()[True].run(big, T).argmax(-1)
    xb = torch.from_numpy(big).to(dev)
    for mode, net in (("s", sj_s), ("m", sj_m)):
        same = ours_pred == sj_predictions(net, xb, T, mode).cpu().numpy()
        print(f"same prediction as SpikingJelly ('{mode}') on {N} images: {same.all(axis=0).mean():.4f} of the "
              f"images at every t, {same[-1].mean():.4f} at t={T}")

    ann = session(source.read_bytes(), "CUDAExecutionProvider")
    name = ann.get_inputs()[0].name
    rows = []
    for label, batch_x in (("batch 1", ones), (f"batch {N}", big)):
        per_image = len(batch_x) if label == "batch 1" else 1
        chunks = [batch_x[i:i + 1] for i in range(len(batch_x))] if label == "batch 1" else [batch_x]
        t_ann = best_seconds(lambda: [ann.run(None, {name: c}) for c in chunks], args.repeats)
        sims = simulators()
        times = {f"onnx-snn, CUDA graphs {'on' if g else 'off'}": best_seconds(
            lambda s=s: [s.run(c, T, per_step=False) for c in chunks], args.repeats) for g, s in sims.items()}
        for mode, net in (("s", sj_s), ("m", sj_m)):
            xs = [torch.from_numpy(c).to(dev) for c in chunks]
            times[f"SpikingJelly '{mode}'"] = best_seconds(
                lambda net=net, mode=mode, xs=xs: [sj_predictions(net, c, T, mode) for c in xs], args.repeats, sync)
        rows.append((label, per_image, len(batch_x), t_ann, times))

    print(f"\n{'':10} {'simulator':28} {'us per timestep':>16} {'img*steps/s':>14} {'/ (T x ANN)':>12}")
    for label, per_image, n, t_ann, times in rows:
        for what, t in times.items():
            print(f"{label:10} {what:28} {1e6 * t / (T * per_image):16.1f} {n * T / t:14,.0f} {t / (T * t_ann):11.2f}x")
        sj_best = min(t for what, t in times.items() if what.startswith("SpikingJelly"))
        ours_best = min(t for what, t in times.items() if what.startswith("onnx-snn"))
        print(f"{label:10} {'onnx-snn / SpikingJelly best':28} speed-up {sj_best / ours_best:.2f}x; "
              f"CUDA graphs cut our latency {times['onnx-snn, CUDA graphs off'] / times['onnx-snn, CUDA graphs on']:.2f}x")


if __name__ == "__main__":
    main()
