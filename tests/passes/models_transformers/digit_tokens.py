"""The bundled digits as token sequences: the 64 pixel intensities (0..16) of each image, row-major.

Imported by the transformer model files beside it (by file path, as ``fxquant`` loads model files).
"""

import torch

LEVELS = 17  # pixel intensities 0..16


def digit_tokens(offset: int = 0):
    """``(t_train, y_train, t_val, y_val)``: int64 tokens ``pixel + offset`` of shape (N, 64)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    t_tr, t_va, y_tr, y_va = train_test_split(raw.data.astype("int64"), raw.target, test_size=0.2,
                                              random_state=0, stratify=raw.target)
    return (torch.tensor(t_tr) + offset, torch.tensor(y_tr), torch.tensor(t_va) + offset, torch.tensor(y_va))
