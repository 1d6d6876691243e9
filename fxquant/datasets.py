"""The embedded default data: scikit-learn's bundled 8x8 digits with a fixed split.

``digits(size, channels)`` returns ``(x_train, y_train, x_val, y_val)`` tensors: images
``(N, channels, size, size)`` in [0, 1] (bilinear upsampling when ``size != 8``), a stratified
80/20 split with ``random_state=0``. Examples and tests share it so their numbers are comparable.

**The digits as token sequences** (for transformer examples, no download): :func:`digit_tokens`
reads each 8x8 image row by row as a sequence of its 64 pixel intensities. scikit-learn's digits
are integers 0..16 (counts of set pixels in 4x4 blocks of the original 32x32 bitmaps), so the
token id of a pixel *is* its intensity: ids ``0..16`` (:data:`PIXEL_LEVELS` = 17), plus two
special tokens, :data:`PAD_ID` = 17 and :data:`CLS_ID` = 18 (:data:`VOCAB_SIZE` = 19). Same split,
same order and the same labels (the digit) as :func:`digits`. Two layouts, length
:data:`SEQ_LEN` = 65 = 64 pixels + one CLS:

- ``style="bert"``: ``[CLS, p0, ..., p63]``; a bidirectional encoder classifies from position 0.
- ``style="gpt"``: ``[p0, ..., p63, CLS]``; a causal decoder classifies from the **last** position,
  the only one that sees the whole sequence (the CLS there is GPT-1's "extract" token). The
  GPT-style example predicts the label as the next token after it, through the language-model
  head: label ``k`` is token :data:`LABEL_TOKEN_BASE` ``+ k`` (:data:`LM_VOCAB_SIZE` = 29 with
  the ten label tokens). Why not next-pixel prediction: per-token accuracy over pixels is
  dominated by the many zero pixels and is not comparable with anything; a digit accuracy is one
  clear number, the same for the CNN, ViT, BERT and GPT examples.

``padded=True`` gives variable-length sequences: each image's trailing zero pixels (in reading
order) are cut and the sequence is filled to :data:`SEQ_LEN` with :data:`PAD_ID` — **after** the
tokens for ``"bert"`` (right padding: position ``i`` is still pixel ``i - 1``), **before** them for
``"gpt"`` (left padding, as batched decoder inference does: the CLS stays at the last position
``SEQ_LEN - 1``). On scikit-learn's digits this cuts 0..5 pixels (1687 of 1797 sequences padded;
no image has an all-zero row, so cutting whole rows would pad nothing). At least one pixel is
always kept. The attention mask is ``ids != PAD_ID`` (1 = attend), so a model can derive it from
the ids alone; ``padded=False`` has no PAD and an all-ones mask.

Batches: :func:`digit_tokens_loaders` yields ``(ids, labels)`` — one int64 tensor input, what
``fxquant.trainer`` accepts (its loop unpacks ``x, y``) — or ``(ids, mask, labels)`` with
``with_mask=True`` for code that feeds the mask separately.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

PIXEL_LEVELS = 17
"""Pixel intensities of scikit-learn's digits are the integers ``0..16``; each is its own token id."""
PAD_ID = 17
"""Padding token id (``padded=True`` only); masked out of attention: mask ``= ids != PAD_ID``."""
CLS_ID = 18
"""Classification token id: first for ``style="bert"``, last for ``style="gpt"``."""
VOCAB_SIZE = 19
"""Input vocabulary: 17 pixel levels + PAD + CLS."""
LABEL_TOKEN_BASE = VOCAB_SIZE
"""GPT-style example: label ``k`` (0..9) is predicted as token ``LABEL_TOKEN_BASE + k``."""
LM_VOCAB_SIZE = VOCAB_SIZE + 10
"""Vocabulary of a language-model head that also predicts the ten label tokens."""
SEQ_LEN = 65
"""Tokens per sequence: 64 pixels + one CLS (padded sequences are filled to this length)."""

Style = Literal["bert", "gpt"]


class TokenSplit(NamedTuple):
    """One split of :func:`digit_tokens`: ``ids`` and ``mask`` ``(N, SEQ_LEN)`` int64 (mask 1 =
    a real token, 0 = padding), ``labels`` ``(N,)`` int64 digits 0..9."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor


def _split():
    """The fixed split shared by every digits task: stratified 80/20, ``random_state=0``, on the
    raw images (integers 0..16); returns ``(images_train, images_val, y_train, y_val)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    x_tr, x_va, y_tr, y_va = train_test_split(raw.images, raw.target, test_size=0.2,
                                              random_state=0, stratify=raw.target)
    return x_tr, x_va, y_tr, y_va


def digits(size: int = 8, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x_tr, x_va, y_tr, y_va = _split()

    def images(a) -> torch.Tensor:
        x = torch.tensor(a / 16.0, dtype=torch.float32)[:, None]
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.repeat(1, channels, 1, 1)

    return images(x_tr), torch.tensor(y_tr), images(x_va), torch.tensor(y_va)


def digits_loaders(batch_size: int, size: int = 8, channels: int = 1) -> tuple[DataLoader, DataLoader]:
    """``(train, val)`` loaders over :func:`digits`; the train loader shuffles."""
    x_tr, y_tr, x_va, y_va = digits(size, channels)
    return (DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(x_va, y_va), batch_size=256, shuffle=False))


def _sequences(images, style: Style, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.tensor(images.reshape(len(images), 64)).round().to(torch.int64)
    if not bool(((pixels >= 0) & (pixels < PIXEL_LEVELS)).all()):
        raise ValueError("digits pixels outside 0..16: scikit-learn's load_digits changed")
    n = len(pixels)
    cls = torch.full((n, 1), CLS_ID, dtype=torch.int64)
    if not padded:
        ids = torch.cat([cls, pixels] if style == "bert" else [pixels, cls], dim=1)
        return ids, torch.ones_like(ids)
    # pixels kept = 1 + index of the last nonzero pixel (at least 1)
    positions = torch.arange(1, 65).expand(n, -1)
    lengths = (positions * pixels.ne(0)).amax(dim=1).clamp(min=1)
    ids = torch.full((n, SEQ_LEN), PAD_ID, dtype=torch.int64)
    for i, length in enumerate(lengths.tolist()):
        content = torch.cat([cls[i], pixels[i, :length]] if style == "bert" else [pixels[i, :length], cls[i]])
        if style == "bert":
            ids[i, :length + 1] = content
        else:
            ids[i, SEQ_LEN - length - 1:] = content
    return ids, ids.ne(PAD_ID).to(torch.int64)


def digit_tokens(style: Style = "bert", padded: bool = False) -> tuple[TokenSplit, TokenSplit]:
    """``(train, val)`` :class:`TokenSplit` of the digits as token sequences (module docstring):
    1437 / 360 sequences of :data:`SEQ_LEN` int64 ids in ``0..VOCAB_SIZE-1``, the split, order and
    labels of :func:`digits`. Deterministic (no randomness involved)."""
    if style not in ("bert", "gpt"):
        raise ValueError(f"style={style!r}: use 'bert' (CLS first) or 'gpt' (CLS last)")
    x_tr, x_va, y_tr, y_va = _split()
    out = []
    for images, labels in ((x_tr, y_tr), (x_va, y_va)):
        ids, mask = _sequences(images, style, padded)
        out.append(TokenSplit(ids, mask, torch.tensor(labels, dtype=torch.int64)))
    return out[0], out[1]


def digit_tokens_loaders(batch_size: int, style: Style = "bert", padded: bool = False,
                         with_mask: bool = False) -> tuple[DataLoader, DataLoader]:
    """``(train, val)`` loaders over :func:`digit_tokens`; the train loader shuffles. Batches are
    ``(ids, labels)``, or ``(ids, mask, labels)`` with ``with_mask``; the validation batch is 256,
    as in :func:`digits_loaders`."""
    train, val = digit_tokens(style, padded)

    def dataset(split: TokenSplit) -> TensorDataset:
        return TensorDataset(*((split.ids, split.mask, split.labels) if with_mask else (split.ids, split.labels)))

    return (DataLoader(dataset(train), batch_size=batch_size, shuffle=True),
            DataLoader(dataset(val), batch_size=256, shuffle=False))
