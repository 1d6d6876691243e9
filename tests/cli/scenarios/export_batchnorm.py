"""Scenario model: conv + BatchNorm with a shape-dependent branch, so torch.fx cannot trace it and
capture falls back to torch.export (whose BN once kept training mode and its ``add_`` bookkeeping)."""

from __future__ import annotations

import torch
from torch import nn

from fxquant.datasets import digits_loaders


class ShapeBranchBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        if x.shape[-1] >= 8:  # Python control flow on a shape: fx cannot trace this
            x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


def model() -> nn.Module:
    return ShapeBranchBN()


def data(batch_size: int = 64):
    return digits_loaders(batch_size)


def example_inputs():
    return (torch.zeros(1, 1, 8, 8),)
