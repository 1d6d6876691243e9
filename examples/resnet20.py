"""CIFAR-shaped ResNet-20 (He et al. 2016, 3 stages x 3 basic blocks, 16/32/64 channels).

Down-sampling shortcuts are 1x1 convolutions with BN (option B) so every residual add is between
two quantized conv outputs. Data: scikit-learn's digits upsampled to 3x32x32 (bilinear), so the
example trains offline; swap ``data()`` for CIFAR-10 loaders in your own model.py.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from fxquant.datasets import digits_loaders


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(3):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def model() -> nn.Module:
    return ResNet20()


def data(batch_size: int = 128) -> tuple[DataLoader, DataLoader]:
    return digits_loaders(batch_size, size=32, channels=3)


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.zeros(1, 3, 32, 32),)
