"""Architectures of the sample models (torch). Trained weights: ``models/<name>.pt``; ONNX: ``models/<name>.onnx``.

* ``sample_cnn``: the seed's network, Conv(1,32,3)-BN-ReLU-AvgPool(2) x3, Flatten, Linear(32,10).
* ``vgg8``: 8 conv layers (32-32-64-64-128-128-128-128) with BatchNorm and ReLU, AvgPool between
  stages, global average pooling, Linear(128,10).
* ``resnet20``: the ResNet-20 layout (He et al. 2016, CIFAR variant: 3 stages x 3 basic blocks,
  16-32-64 channels, residual Adds, 1x1 projection shortcuts), global average pooling, Linear(64,10).
* ``maxpool_cnn``: a LeNet-like network with MaxPool: Conv(1,32,3)-BN-ReLU-MaxPool(2),
  Conv(32,64,3)-BN-ReLU-MaxPool(2), Flatten, Linear(1600,128)-ReLU, Linear(128,10).
* ``mobilenet_s`` (held out): MobileNet-style, stem Conv(1,32,3)-BN-ReLU6, then 5 depthwise-separable
  blocks (depthwise 3x3 Conv with groups = channels, BN, ReLU6, pointwise 1x1 Conv, BN, ReLU6;
  widths 64(stride 2)-64-128(stride 2)-128-128, so 28-14-7 pixels), global average pooling,
  Linear(128,10). ReLU6 exports as Clip(0, 6).
* ``densenet_s`` (held out): DenseNet-BC-style, stem Conv(1,24,3,stride 2), 3 dense blocks (14, 7, 3
  pixels) of 4 bottleneck layers (pre-activation BN-ReLU-Conv1x1(48)-BN-ReLU-Conv3x3(12), growth
  rate 12, inputs joined by Concat, so BatchNorm follows a Concat), transitions BN-ReLU-Conv1x1
  (compression 0.5)-AvgPool(2) (72-36, 84-42 channels), final BN-ReLU (90 channels), global average
  pooling, Linear(90,10).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def conv_bn_relu(cin: int, cout: int, padding: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def sample_cnn() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(3):
        layers += [nn.Conv2d(channels, 32, 3), nn.BatchNorm2d(32, eps=1e-3), nn.ReLU(), nn.AvgPool2d(2, 2)]
        channels = 32
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32, 10))


def vgg8() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 1
    for stage, width in enumerate((32, 64, 128, 128)):
        layers += conv_bn_relu(cin, width) + conv_bn_relu(width, width)
        if stage < 2:
            layers.append(nn.AvgPool2d(2))
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(1, 16))
        blocks, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def resnet20() -> nn.Module:
    return ResNet20()


def maxpool_cnn() -> nn.Sequential:
    return nn.Sequential(*conv_bn_relu(1, 32, 0), nn.MaxPool2d(2), *conv_bn_relu(32, 64, 0), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10))


def dw_separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]


def mobilenet_s() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
    cin = 32
    for cout, stride in ((64, 2), (64, 1), (128, 2), (128, 1), (128, 1)):
        layers += dw_separable(cin, cout, stride)
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


class DenseLayer(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k) on the concatenated inputs."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(),
                                  nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.body(torch.cat(features, 1))


class DenseBlock(nn.Module):
    def __init__(self, cin: int, layers: int, growth: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNetS(nn.Module):
    def __init__(self, growth: int = 12, layers: int = 4, blocks: int = 3):
        super().__init__()
        channels = 2 * growth
        stages: list[nn.Module] = [nn.Conv2d(1, channels, 3, 2, 1, bias=False)]
        for b in range(blocks):
            stages.append(DenseBlock(channels, layers, growth))
            channels += layers * growth
            if b < blocks - 1:
                stages += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels // 2, 1, bias=False),
                           nn.AvgPool2d(2)]
                channels //= 2
        self.features = nn.Sequential(*stages, nn.BatchNorm2d(channels), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))

    def forward(self, x):
        return self.head(self.features(x))


def densenet_s() -> nn.Module:
    return DenseNetS()


ARCHITECTURES = {"sample_cnn": sample_cnn, "vgg8": vgg8, "resnet20": resnet20, "maxpool_cnn": maxpool_cnn,
                 "mobilenet_s": mobilenet_s, "densenet_s": densenet_s}
# Held out: never used to choose recipes or defaults, only reported (separately) in the accuracy benchmark.
HELD_OUT = ("mobilenet_s", "densenet_s")


def load_trained(name: str = "sample_cnn") -> nn.Module:
    model = ARCHITECTURES[name]()
    model.load_state_dict(torch.load(HERE / f"{name}.pt", map_location="cpu", weights_only=True))
    return model.eval()
