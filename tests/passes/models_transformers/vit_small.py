"""torchvision VisionTransformer (image 32, patch 8, 2 layers, 2 heads, hidden 64, MLP 128) on the
bundled digits upsampled to 32x32 RGB; a few batches (CI-sized)."""

import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import VisionTransformer

from fxquant.datasets import digits

TRAIN, VAL = 256, 128


def model():
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
                             mlp_dim=128, num_classes=10)


def example_inputs():
    return (torch.zeros(1, 3, 32, 32),)


def data(batch_size=32):
    x_tr, y_tr, x_va, y_va = digits(size=32, channels=3)
    return (DataLoader(TensorDataset(x_tr[:TRAIN], y_tr[:TRAIN]), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(x_va[:VAL], y_va[:VAL]), batch_size=64))
