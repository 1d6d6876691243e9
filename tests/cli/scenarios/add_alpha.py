"""Scenario model: a residual ``torch.add(a, b, alpha=0.5)`` (once lowered as ``a + b``)."""

from __future__ import annotations

import torch
from torch import nn

from fxquant.datasets import digits_loaders


class AddAlpha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.conv2(a))
        y = torch.add(a, b, alpha=0.5)
        return self.fc(torch.flatten(y, 1))


def model() -> nn.Module:
    return AddAlpha()


def data(batch_size: int = 64):
    return digits_loaders(batch_size)


def example_inputs():
    return (torch.zeros(1, 1, 8, 8),)
