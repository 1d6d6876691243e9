"""Shared fixtures: tiny models covering every op the passes must handle."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from torch import nn

import fxquant.ops  # noqa: F401  (registers torch.ops.fxquant)

# `make test` runs the suite on pytest-xdist workers (``-n``): the cores are split between them, as
# oversubscribed intra-op threads only slow every worker down.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
# CI machines are small and shared: wall-clock deadlines would make property tests flaky.
settings.register_profile("fxquant", deadline=None, max_examples=50)
settings.load_profile("fxquant")


def pytest_collection_modifyitems(config, items):
    """Tests that share a module-scoped fixture instance (a training run, a build) form one
    pytest-xdist group (``--dist loadgroup``): one worker sets the instance up once, as a serial run
    does, instead of every worker repeating it. A parametrized module fixture (one trained model per
    parameter) is one group per parameter; other tests are spread one by one."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        shared = [name for name, defs in info.name2fixturedefs.items() if any(d.scope == "module" for d in defs)]
        if not shared:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        keys = [f"{name}={params[name]}" for name in shared if name in params]
        item.add_marker(pytest.mark.xdist_group(item.module.__name__ + (f"[{','.join(keys)}]" if keys else "")))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


class ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)) + x)
        return self.fc(torch.flatten(self.pool(out), 1))


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


@pytest.fixture
def resblock() -> nn.Module:
    torch.manual_seed(0)
    return ResBlock()
