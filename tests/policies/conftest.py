"""Tiny quantized graphs for policy tests (a conv and a linear layer on 1x4x4 inputs)."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from fxquant.passes import InsertQuantizers, capture


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


@pytest.fixture
def tiny() -> fx.GraphModule:
    torch.manual_seed(0)
    gm = capture(Tiny(), (torch.zeros(1, 1, 4, 4),))
    InsertQuantizers()(gm)
    gm.train()
    return gm


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: OpenMP threads only add contention (10x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
