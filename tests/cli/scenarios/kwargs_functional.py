"""Scenario model: keyword arguments, functional conv/linear on parameters, view(x.size(0), -1).

Each construct once broke the integer lowering silently or loudly (issue "Sound by construction"):
``F.max_pool2d(x, 3, stride=1, padding=1)`` lowered as stride 3 / padding 0, ``F.conv2d`` with a
module's weight was refused with an object repr, ``x.view(x.size(0), -1)`` lowered ``size`` as an op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.datasets import digits_loaders


class KwargsFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.fc = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.conv1.weight, self.conv1.bias, stride=1, padding=1))
        x = F.max_pool2d(x, 3, stride=1, padding=1)
        x = F.relu(F.conv2d(x, self.conv2.weight, bias=self.conv2.bias, stride=2, padding=0))
        x = x.view(x.size(0), -1)
        return F.linear(x, self.fc.weight, bias=self.fc.bias)


def model() -> nn.Module:
    return KwargsFunctional()


def data(batch_size: int = 64):
    return digits_loaders(batch_size)


def example_inputs():
    return (torch.zeros(1, 1, 8, 8),)
