"""Scenario model: a transparent op before the first quantizer (``nn.Flatten`` first in an
``nn.Sequential``) and ``torch.flatten(x, 2)`` before a Linear (a rank-3 linear)."""

from __future__ import annotations

import torch
from torch import nn

from fxquant.datasets import digits_loaders


class FlattenShapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rows = nn.Linear(8, 16)  # applied to every image row: (N, 8 rows, 8) -> (N, 8, 16)
        self.head = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(8 * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.flatten(x, 2)                     # (N, 1, 64)
        rows = rows.reshape(rows.shape[0], 8, 8)       # (N, 8, 8): one row per position
        return self.head(self.rows(rows))


def model() -> nn.Module:
    return FlattenShapes()


def data(batch_size: int = 64):
    return digits_loaders(batch_size)


def example_inputs():
    return (torch.zeros(1, 1, 8, 8),)
