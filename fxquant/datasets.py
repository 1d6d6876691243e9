"""The embedded default data: scikit-learn's bundled 8x8 digits with a fixed split.

``digits(size, channels)`` returns ``(x_train, y_train, x_val, y_val)`` tensors: images
``(N, channels, size, size)`` in [0, 1] (bilinear upsampling when ``size != 8``), a stratified
80/20 split with ``random_state=0``. Examples and tests share it so their numbers are comparable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def digits(size: int = 8, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    x_tr, x_va, y_tr, y_va = train_test_split(raw.images / 16.0, raw.target, test_size=0.2,
                                              random_state=0, stratify=raw.target)

    def images(a) -> torch.Tensor:
        x = torch.tensor(a, dtype=torch.float32)[:, None]
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.repeat(1, channels, 1, 1)

    return images(x_tr), torch.tensor(y_tr), images(x_va), torch.tensor(y_va)


def digits_loaders(batch_size: int, size: int = 8, channels: int = 1) -> tuple[DataLoader, DataLoader]:
    """``(train, val)`` loaders over :func:`digits`; the train loader shuffles."""
    x_tr, y_tr, x_va, y_va = digits(size, channels)
    return (DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(x_va, y_va), batch_size=256, shuffle=False))
