"""The seed's sample CNN (SpikingJelly's ann2snn tutorial network) and its training script.

    Conv(1,32,3)-BN-ReLU-AvgPool(2) x3 (32 channels), Flatten, Linear(32,10)

Run ``python models/sample_cnn.py`` to train it on Fashion-MNIST (the full set from the
Debian package ``dataset-fashion-mnist`` when present, else the bundled subset) and to
write ``sample_cnn.pt`` (state_dict) and ``sample_cnn.onnx`` (TorchScript exporter,
BatchNormalization kept so the converter's folding pass has work to do) beside this file.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "runtime"))
from onnx_snn_runtime.datasets import load_fashion_mnist  # noqa: E402


def sample_cnn() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(3):
        layers += [nn.Conv2d(channels, 32, 3), nn.BatchNorm2d(32, eps=1e-3), nn.ReLU(), nn.AvgPool2d(2, 2)]
        channels = 32
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32, 10))


def load_trained(path: Path = HERE / "sample_cnn.pt") -> nn.Sequential:
    model = sample_cnn()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def accuracy(model: nn.Module, x, y, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum()
    return float(correct) / len(x)


def train(epochs: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    model = sample_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * ((len(x_train) + 127) // 128))
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for epoch in range(epochs):
        model.train()
        start = time.time()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 128):
            idx = perm[i:i + 128]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, test accuracy "
              f"{accuracy(model, x_test, y_test):.4f} ({time.time() - start:.0f} s)", flush=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = train(args.epochs, args.seed)
    torch.save(model.state_dict(), HERE / "sample_cnn.pt")
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(HERE / "sample_cnn.onnx"), dynamo=False,
                      input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    print(f"wrote {HERE / 'sample_cnn.pt'} and {HERE / 'sample_cnn.onnx'}")


if __name__ == "__main__":
    main()
