"""A torchvision classifier as an fxquant model file: the architecture is chosen by environment.

torchvision's own model definitions (``weights=None``, 10 classes) on scikit-learn's digits,
upsampled to 3x32x32 (:func:`fxquant.datasets.digits_loaders`), so it trains offline::

    FXQUANT_TV_ARCH=mobilenet_v2 fxquant train --policy static --bits 8 examples/torchvision_model.py --out runs/mnv2
    FXQUANT_TV_ARCH=mobilenet_v2 fxquant export --target cpu runs/mnv2

Environment (read each time the file is loaded, so **export with the same values as train**: a run
records this file's path and SHA-256, not the environment; another architecture's checkpoint is
refused by ``export`` with "checkpoint ... does not fit"):

- ``FXQUANT_TV_ARCH``: any name in :data:`ARCHS` (default ``resnet18``): the function of
  ``torchvision.models`` called as ``fn(weights=None, num_classes=10)``.
- ``FXQUANT_TV_TRAIN`` / ``FXQUANT_TV_VAL``: keep only the first N training / validation samples
  of the fixed split (default: all 1437 / 360), for quick runs (tests, benchmarks). The training
  subset is the first N of the split, so the class mix is that of the split's order.

Dropout (classifier heads) and stochastic depth (efficientnet) are identity in eval mode, which
is what is exported. A model file may ``import torchvision`` directly: fxquant's loader makes it
importable beside the CPU torch (:mod:`fxquant.torchvision_compat`).
"""

from __future__ import annotations

import os

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset

from fxquant.datasets import digits_loaders

ARCHS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "squeezenet1_1")
"""The architectures of issue 13's zoo (any other ``torchvision.models`` classifier name also works)."""
NUM_CLASSES = 10
SIZE = 32


def arch() -> str:
    return os.environ.get("FXQUANT_TV_ARCH", "resnet18")


def model() -> nn.Module:
    name = arch()
    fn = getattr(torchvision.models, name, None)
    if not callable(fn):
        raise ValueError(f"FXQUANT_TV_ARCH={name!r} is not a torchvision.models classifier (try one of {ARCHS})")
    return fn(weights=None, num_classes=NUM_CLASSES)


def _first(loader: DataLoader, env: str, train: bool) -> DataLoader:
    n = os.environ.get(env)
    dataset = loader.dataset if not n else Subset(loader.dataset, range(min(int(n), len(loader.dataset))))
    # drop_last for training: BatchNorm in train mode needs more than one value per channel, and a
    # 1x1-spatial block (resnet18's layer4 at 32x32) sees exactly batch-many
    return DataLoader(dataset, batch_size=loader.batch_size, shuffle=train, drop_last=train)


def data(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    train, val = digits_loaders(batch_size, size=SIZE, channels=3)
    return _first(train, "FXQUANT_TV_TRAIN", True), _first(val, "FXQUANT_TV_VAL", False)


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.zeros(1, 3, SIZE, SIZE),)
