"""Train a model of ``models/zoo.py`` on Fashion-MNIST and write ``models/<name>.pt`` and ``.onnx``.

    python models/train.py vgg8 --epochs 12 --augment

Uses the full Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` when present,
else the bundled subset. The ONNX file is exported with the TorchScript exporter, opset 17,
dynamic batch, BatchNormalization kept (the converter folds it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "runtime")]
from onnx_snn_runtime.datasets import load_fashion_mnist  # noqa: E402
from zoo import ARCHITECTURES  # noqa: E402


def accuracy(model: nn.Module, x, y, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum()
    return float(correct) / len(x)


def augment_batch(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip and random shift by up to 2 pixels (zero padding)."""
    flip = torch.rand(len(x)) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,))
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


def train(name: str, epochs: int, lr: float, augment: bool, seed: int, batch: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    model = ARCHITECTURES[name]()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4 if augment else 0.0)
    steps = epochs * ((len(x_train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for epoch in range(epochs):
        model.train()
        start = time.time()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            xb = augment_batch(xt[idx]) if augment else xt[idx]
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"{name} epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, test accuracy "
              f"{accuracy(model, x_test, y_test):.4f} ({time.time() - start:.0f} s)", flush=True)
    return model.eval()


def export(model: nn.Module, path: Path) -> None:
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False,
                      input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(ARCHITECTURES))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--augment", action="store_true", help="random flips and shifts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = train(args.name, args.epochs, args.lr, args.augment, args.seed)
    torch.save(model.state_dict(), HERE / f"{args.name}.pt")
    export(model, HERE / f"{args.name}.onnx")
    print(f"wrote {HERE / (args.name + '.pt')} and {HERE / (args.name + '.onnx')}")


if __name__ == "__main__":
    main()
