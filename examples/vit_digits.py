"""torchvision ``VisionTransformer`` (small config) on scikit-learn's digits upsampled to 3x32x32.

Data: :func:`fxquant.datasets.digits_loaders` with ``size=32, channels=3`` (bilinear, as in
``examples/torchvision_model.py``): 16 patches of 8x8 plus the class token. Model: image 32,
patch 8, 2 layers, 2 heads, hidden 64, MLP 128, 10 classes (``torchvision.models.
VisionTransformer``'s own definition: ``nn.MultiheadAttention``, LayerNorm eps 1e-6, GELU,
dropout 0). Offline. A model file may ``import torchvision`` directly: fxquant's loader makes it
importable beside the CPU torch (:mod:`fxquant.torchvision_compat`); this file also calls
:func:`~fxquant.torchvision_compat.define_missing_schemas` itself, so ``import`` works elsewhere.

Training defaults (:data:`TRAIN`) are the settings ``benchmarks/transformer_fp32.py`` measured
(docs/transformers.md); ``fxquant train`` does not read them, pass them::

    fxquant train --policy static --bits 8 --epochs 40 --lr 0.05 --batch-size 32 examples/vit_digits.py --out runs/vit
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from fxquant.datasets import digits_loaders
from fxquant.torchvision_compat import define_missing_schemas

define_missing_schemas()
import torchvision  # noqa: E402  (after the schemas: see fxquant.torchvision_compat)

SIZE = 32
TRAIN = {"epochs": 40, "lr": 0.05, "batch_size": 32}
"""Epochs, SGD learning rate and batch size that reach the FP32 accuracy of docs/transformers.md
(fxquant's recipe: SGD momentum 0.9 Nesterov, weight decay 5e-4, cosine schedule)."""


def model() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=64, mlp_dim=128, num_classes=10)


def data(batch_size: int = TRAIN["batch_size"]) -> tuple[DataLoader, DataLoader]:
    return digits_loaders(batch_size, size=SIZE, channels=3)


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.zeros(1, 3, SIZE, SIZE),)
