"""The digits as token sequences (fxquant.datasets.digit_tokens): layout, masks and labels against
an independent reading of scikit-learn's bundled digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant.datasets import (CLS_ID, LABEL_TOKEN_BASE, LM_VOCAB_SIZE, PAD_ID, PIXEL_LEVELS, SEQ_LEN, VOCAB_SIZE,
                              _sequences, digit_tokens, digit_tokens_loaders, digits)

STYLES = ("bert", "gpt")


@pytest.fixture(scope="module")
def oracle():
    """Pixels (N, 64) int64 and labels straight from sklearn with the documented split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    x_tr, x_va, y_tr, y_va = train_test_split(raw.data, raw.target, test_size=0.2, random_state=0,
                                              stratify=raw.target)
    return {"train": (torch.tensor(x_tr).long(), torch.tensor(y_tr)), "val": (torch.tensor(x_va).long(), torch.tensor(y_va))}


@pytest.fixture(scope="module")
def tokens():
    return {(s, p): digit_tokens(s, p) for s in STYLES for p in (False, True)}


def test_constants():
    assert PIXEL_LEVELS == 17 and VOCAB_SIZE == 19 and SEQ_LEN == 65
    assert {PAD_ID, CLS_ID} == {17, 18}
    assert LABEL_TOKEN_BASE == VOCAB_SIZE and LM_VOCAB_SIZE == VOCAB_SIZE + 10


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("style", STYLES)
def test_shapes_dtypes_vocab(tokens, style, padded):
    for split, n in zip(tokens[style, padded], (1437, 360)):
        assert split.ids.shape == split.mask.shape == (n, SEQ_LEN)
        assert split.labels.shape == (n,)
        assert split.ids.dtype == split.mask.dtype == split.labels.dtype == torch.int64
        assert int(split.ids.min()) >= 0 and int(split.ids.max()) < VOCAB_SIZE
        assert set(split.labels.unique().tolist()) == set(range(10))
        assert (split.ids.eq(CLS_ID).sum(1) == 1).all()
        cls_pos = 0 if style == "bert" else SEQ_LEN - 1
        assert (split.ids[:, cls_pos] == CLS_ID).all()


@pytest.mark.parametrize("style", STYLES)
def test_unpadded_is_the_image_row_by_row(tokens, oracle, style):
    for split, key in zip(tokens[style, False], ("train", "val")):
        pixels, labels = oracle[key]
        body = split.ids[:, 1:] if style == "bert" else split.ids[:, :-1]
        assert torch.equal(body, pixels)
        assert torch.equal(split.labels, labels)
        assert (split.mask == 1).all() and not split.ids.eq(PAD_ID).any()


@pytest.mark.parametrize("style", STYLES)
def test_labels_and_pixels_match_the_image_dataset(tokens, style):
    x_tr, y_tr, x_va, y_va = digits()
    for split, x, y in zip(tokens[style, True], (x_tr, x_va), (y_tr, y_va)):
        assert torch.equal(split.labels, y)
        pixels = (x[:, 0] * 16).round().long().reshape(len(x), 64)
        real = split.ids[split.mask.bool()].view(-1)  # row-major: each sequence's real tokens in order
        lengths = split.mask.sum(1) - 1  # pixel tokens per sequence (minus the CLS)
        expected = [torch.cat([torch.tensor([CLS_ID]), p[:n]] if style == "bert" else [p[:n], torch.tensor([CLS_ID])])
                    for p, n in zip(pixels, lengths.tolist())]
        assert torch.equal(real, torch.cat(expected))


@pytest.mark.parametrize("style", STYLES)
def test_padding_cuts_exactly_the_trailing_zero_pixels(tokens, oracle, style):
    for split, key in zip(tokens[style, True], ("train", "val")):
        pixels, _ = oracle[key]
        assert torch.equal(split.mask, split.ids.ne(PAD_ID).long())
        lengths = split.mask.sum(1) - 1  # pixel tokens kept (minus the CLS)
        trailing_zeros = pixels.ne(0).flip(1).long().argmax(1)  # zeros after the last nonzero pixel
        assert torch.equal(lengths, 64 - trailing_zeros)
        n_pad = SEQ_LEN - 1 - lengths
        positions = torch.arange(SEQ_LEN).expand_as(split.ids)
        # padding is contiguous: after the tokens for bert (right), before them for gpt (left)
        pad_where = positions > lengths[:, None] if style == "bert" else positions < n_pad[:, None]
        assert torch.equal(split.ids.eq(PAD_ID), pad_where)
        assert 0.5 < float(split.ids.eq(PAD_ID).any(1).float().mean()) < 1.0  # masks are exercised


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("style", STYLES)
def test_deterministic(tokens, style, padded):
    again = digit_tokens(style, padded)
    for a, b in zip(tokens[style, padded], again):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_loaders_batch_format(tokens):
    train, val = digit_tokens_loaders(32, style="gpt", padded=True)
    ids, y = next(iter(train))
    assert ids.shape == (32, SEQ_LEN) and ids.dtype == torch.int64 and y.shape == (32,)
    batches = list(val)
    assert torch.equal(torch.cat([b[0] for b in batches]), tokens["gpt", True][1].ids)  # val is not shuffled
    train, val = digit_tokens_loaders(16, style="bert", padded=True, with_mask=True)
    ids, mask, y = next(iter(val))
    split = tokens["bert", True][1]
    assert torch.equal(ids, split.ids[:256]) and torch.equal(mask, split.mask[:256]) and torch.equal(y, split.labels[:256])
    assert len(next(iter(train))) == 3


def test_bad_style():
    with pytest.raises(ValueError, match="style"):
        digit_tokens("t5")


@given(st.lists(st.integers(0, 16), min_size=64, max_size=64), st.integers(0, 64),
       st.sampled_from(STYLES))
def test_sequences_round_trip(values, zeros, style):
    """Any image → padded ids; dropping PAD and CLS gives the image's pixels in reading order with
    exactly its trailing zeros cut (an all-zero image keeps one pixel)."""
    flat = np.array(values, dtype=float)
    flat[64 - zeros:] = 0
    ids, mask = _sequences(flat.reshape(1, 8, 8), style, padded=True)
    kept = ids[0][(ids[0] != PAD_ID) & (ids[0] != CLS_ID)]
    nonzero = np.flatnonzero(flat)
    n = int(nonzero[-1]) + 1 if len(nonzero) else 1
    assert torch.equal(kept, torch.tensor(flat[:n]).long())
    assert torch.equal(mask[0], ids[0].ne(PAD_ID).long())
    assert int(ids[0].eq(CLS_ID).sum()) == 1 and ids[0, 0 if style == "bert" else -1] == CLS_ID
