"""A small CNN on scikit-learn's bundled 8x8 digits — fxquant's embedded default model.

model.py contract: ``model()`` returns the ``nn.Module``; optional ``data(batch_size)`` returns
``(train_loader, val_loader)``; optional ``example_inputs()`` returns a tuple of inputs.
Data: :func:`fxquant.datasets.digits` (fixed stratified 80/20 split, pixels in [0, 1]).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from fxquant.datasets import digits_loaders


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = self.pool(torch.relu(self.bn3(self.conv3(x))))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def model() -> nn.Module:
    return DigitsCNN()


def data(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    return digits_loaders(batch_size)


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.zeros(1, 1, 8, 8),)
