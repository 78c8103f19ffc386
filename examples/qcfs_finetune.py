"""Fine-tune a trained model with QCFS activations, export it, convert it and simulate it at few steps.

    python examples/qcfs_finetune.py [--model sample_cnn] [--levels 4] [--epochs 1] [--out DIR]
        [--train-images N] [--train-start I] [--resume PT] [--test-images N] [--T 4 8] [--lr 0.01] [--batch 128]

Loads ``models/<model>.pt`` (``models/zoo.py``), swaps its ReLUs for the quantization-clip-floor-
shift activation with L = ``--levels`` (``onnx_snn.qcfs``), fine-tunes it on Fashion-MNIST (the
full set when the Debian package is installed, else the bundled slice), writes
``DIR/<model>_qcfs.pt`` (state dict) and ``DIR/<model>_qcfs.onnx``, then converts the ONNX file
(the converter recognises the activations and keeps their trained λ) and prints the accuracy of
the original ANN, of the quantized ANN and of the SNN after each T. The defaults are a quick
demonstration on the sample CNN; docs/qcfs.md has the ResNet-20 figures.
"""
import argparse
import logging
import sys
import time
from pathlib import Path

import onnx
import torch
from onnx_snn_runtime import Simulator
from onnx_snn_runtime.datasets import fashion_mnist

import onnx_snn
from onnx_snn.qcfs import accuracy, finetune, qcfs_layers, replace_relus
from onnx_snn.torch_export import export_module

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
from zoo import ARCHITECTURES, load_trained  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sample_cnn", choices=sorted(ARCHITECTURES))
    parser.add_argument("--levels", type=int, default=4, help="QCFS levels L (default 4)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", default="example_output", help="folder for <model>_qcfs.pt and .onnx")
    parser.add_argument("--train-images", type=int, default=5000, help="training images (0: all)")
    parser.add_argument("--train-start", type=int, default=0, help="index of the first training image")
    parser.add_argument("--resume", default=None, help="continue from a <model>_qcfs.pt an earlier run wrote")
    parser.add_argument("--test-images", type=int, default=1000, help="test images (0: all)")
    parser.add_argument("--T", type=int, nargs="*", default=None, help="timesteps to simulate (default: L, 2L)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--calib", type=int, default=1024, help="images for the initial λ and the converter")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("onnxscript", "onnx_ir", "onnx_snn", "onnx_snn_runtime"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("onnx_snn.qcfs").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x_train, y_train, origin = fashion_mnist("train")
    x_test, y_test, _ = fashion_mnist("test")
    x_calib = x_train[:args.calib]
    stop = args.train_start + args.train_images if args.train_images else None
    x_train, y_train = x_train[args.train_start:stop], y_train[args.train_start:stop]
    if args.test_images:
        x_test, y_test = x_test[:args.test_images], y_test[:args.test_images]
    print(f"Fashion-MNIST: {origin}; {len(x_train)} training images from index {args.train_start}, "
          f"{len(x_test)} test images")

    model = load_trained(args.model)
    ann_accuracy = accuracy(model, x_test, y_test)
    if args.resume:
        replace_relus(model, args.levels)
        model.load_state_dict(torch.load(args.resume, map_location="cpu", weights_only=True))
        print(f"resumed from {args.resume}: quantized ANN {accuracy(model, x_test, y_test):.4f}")
    start = time.perf_counter()
    finetune(model, x_train, y_train, args.epochs, args.levels, lr=args.lr, batch=args.batch, calib=args.calib,
             progress=args.progress)
    minutes = (time.perf_counter() - start) / 60
    quantized = accuracy(model, x_test, y_test)
    print(f"fine-tuned {args.model} with QCFS L={args.levels} for {args.epochs} epoch(s) in {minutes:.1f} min "
          f"({torch.get_num_threads()} threads); lambda per layer:",
          [round(q.lam.item(), 3) for q in qcfs_layers(model)])
    torch.save(model.state_dict(), out / f"{args.model}_qcfs.pt")
    onnx_path = out / f"{args.model}_qcfs.onnx"
    onnx.save(export_module(model, torch.from_numpy(x_calib[:2]), exporter="torchscript"), onnx_path)
    print(f"wrote {out / f'{args.model}_qcfs.pt'} and {onnx_path}")

    print(f"accuracy on {len(x_test)} test images: original ANN {ann_accuracy:.4f}, quantized ANN {quantized:.4f}")
    # QCFS layers take λ and v_init from the graph, so one step model serves every T: simulate the
    # longest T once and read the accuracy after each T from the curve
    ts = sorted(args.T or [args.levels, 2 * args.levels])
    converter = onnx_snn.Converter(x_calib, mode="max", target_T=args.levels, progress=False)
    snn = converter(onnx_path)
    sim = Simulator(snn.SerializeToString(), "cpu", threads=args.threads)
    start = time.perf_counter()
    ev = sim.evaluate((x_test, y_test), ts[-1], batch_size=250, progress=args.progress)
    print(f"converted: {len(converter.record.trained)} trained QCFS layers of {len(converter.record.sites)}; "
          f"simulated T = {ts[-1]} in {time.perf_counter() - start:.0f} s")
    for T in ts:
        print(f"SNN at T = {T}: {ev.accuracy[T - 1]:.4f} (original ANN {ann_accuracy:.4f}, quantized ANN "
              f"{quantized:.4f}; gap to the ANN {100 * (ann_accuracy - ev.accuracy[T - 1]):+.2f} points)")


if __name__ == "__main__":
    main()
