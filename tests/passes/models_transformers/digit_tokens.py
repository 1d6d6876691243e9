"""The bundled digits as token sequences: the 64 pixel intensities (0..16) of each image, row-major.

Imported by the transformer model files beside it (by file path, as ``fxquant`` loads model files).
The tokens are :func:`fxquant.datasets.digit_tokens`' (its split), without that task's special tokens.
"""

from fxquant.datasets import PIXEL_LEVELS as LEVELS  # noqa: F401  (pixel intensities 0..16)
from fxquant.datasets import digit_tokens as _shared_tokens


def digit_tokens(offset: int = 0):
    """``(t_train, y_train, t_val, y_val)``: int64 tokens ``pixel + offset`` of shape (N, 64)."""
    train, val = _shared_tokens("gpt")  # [p0 .. p63, CLS]: the pixels are the first 64 tokens
    return train.ids[:, :64] + offset, train.labels, val.ids[:, :64] + offset, val.labels
