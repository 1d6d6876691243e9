"""Hugging Face ``GPT2LMHeadModel`` (tiny config) classifying the digits as its next token.

Task (:func:`fxquant.datasets.digit_tokens`, ``style="gpt"``): each 8x8 digit image read row by
row as 64 pixel-intensity tokens (ids 0..16) followed by a CLS "extract" token (id 18) at the last
position, the only one a causal model lets see the whole image. The model predicts the label as
the token after it: the language-model head (tied to the input embedding, vocabulary 29 = 19 input
tokens + ten label tokens) is read at the last position and restricted to the label tokens
``LABEL_TOKEN_BASE + 0..9``, giving ``(N, 10)`` logits for the digit. Same split and labels as
the CNN examples. Offline: the data ship with scikit-learn.

Model: ``n_embd`` 64, 2 layers, 2 heads, ``n_inner`` 128, GELU (tanh form, GPT-2's ``gelu_new``),
65 positions, dropout :data:`DROPOUT`, Hugging Face's default attention implementation (causal).
Its projections are transformers' ``Conv1D`` (``addmm``). ``logits_to_keep=1`` applies the head
to the last position only.

Environment (read each time the file is loaded: **export with the same value as train**):

- ``FXQUANT_TOKENS_PADDED=1``: variable-length sequences, trailing all-zero rows cut and **left**
  padded with PAD (the CLS stays last); the wrapper passes ``attention_mask = (ids != PAD_ID)``,
  so padding is masked on top of the causal mask. Position ids are GPT-2's default ``0..64``, so
  a left-padded image starts at position 8·(rows cut), a whole number of rows (columns keep their
  position mod 8). Default ``0``: every sequence is 65 tokens and no mask is passed.

Training defaults (:data:`TRAIN`), as in ``examples/bert_digits.py``::

    fxquant train --policy static --bits 8 --epochs 40 --lr 0.05 --batch-size 32 examples/gpt2_digits.py --out runs/gpt2
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import DataLoader

from fxquant.torchvision_compat import define_missing_schemas
from fxquant.datasets import CLS_ID, LABEL_TOKEN_BASE, LM_VOCAB_SIZE, PAD_ID, SEQ_LEN, digit_tokens, digit_tokens_loaders

DROPOUT = 0.1
TRAIN = {"epochs": 40, "lr": 0.05, "batch_size": 32}
"""Epochs, SGD learning rate and batch size that reach the FP32 accuracy of docs/transformers.md
(fxquant's recipe: SGD momentum 0.9 Nesterov, weight decay 5e-4, cosine schedule)."""


def padded() -> bool:
    return os.environ.get("FXQUANT_TOKENS_PADDED", "0") == "1"


class GPT2Digits(nn.Module):
    """``forward(ids: int64 (N, 65)) -> logits (N, 10)`` of the label tokens at the last position;
    ``self.gpt`` is the HF model."""

    def __init__(self, padded: bool) -> None:
        super().__init__()
        define_missing_schemas()  # transformers imports torchvision: see fxquant.torchvision_compat
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=LM_VOCAB_SIZE, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=2,
                            n_inner=128, resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, attn_pdrop=DROPOUT,
                            bos_token_id=CLS_ID, eos_token_id=CLS_ID, pad_token_id=PAD_ID)
        self.padded = padded
        self.gpt = GPT2LMHeadModel(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids.ne(PAD_ID).to(torch.int64) if self.padded else None
        logits = self.gpt(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        return logits[:, -1, LABEL_TOKEN_BASE:LABEL_TOKEN_BASE + 10]


def model() -> nn.Module:
    return GPT2Digits(padded())


def data(batch_size: int = TRAIN["batch_size"]) -> tuple[DataLoader, DataLoader]:
    return digit_tokens_loaders(batch_size, style="gpt", padded=padded())


def example_inputs() -> tuple[torch.Tensor, ...]:
    """The first validation sequence (with padding, the first one that has some)."""
    ids = digit_tokens("gpt", padded())[1].ids
    has_pad = ids.eq(PAD_ID).any(dim=1)
    return (ids[int(has_pad.nonzero()[0])][None] if padded() else ids[:1],)
