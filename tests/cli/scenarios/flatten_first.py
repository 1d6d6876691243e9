"""Scenario model: ``nn.Sequential(nn.Flatten(), nn.Linear(...))`` — the first op is transparent,
so the input quantizer once ended up after it and export said "output is never quantized"."""

from __future__ import annotations

import torch
from torch import nn

from fxquant.datasets import digits_loaders


def model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def data(batch_size: int = 64):
    return digits_loaders(batch_size)


def example_inputs():
    return (torch.zeros(1, 1, 8, 8),)
