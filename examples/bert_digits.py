"""Hugging Face ``BertForSequenceClassification`` (tiny config) on the digits as token sequences.

Task (:func:`fxquant.datasets.digit_tokens`, ``style="bert"``): each 8x8 digit image read row by
row as 64 pixel-intensity tokens (ids 0..16) after a CLS token (id 18); the label is the digit,
read from the CLS position by BERT's pooler and classifier. Same split and labels as the CNN
examples, so the accuracies compare. Offline: the data ship with scikit-learn.

Model: hidden 64, 2 layers, 2 heads, intermediate 128, GELU, 65 positions, vocabulary 19
(``pad_token_id`` is :data:`~fxquant.datasets.PAD_ID` = 17, so pixel 0 keeps a trained embedding),
dropout :data:`DROPOUT`, Hugging Face's default attention implementation. ``model()`` wraps it so
that ``forward(ids)`` takes one int64 ``(N, 65)`` tensor and returns the ``(N, 10)`` logits (what
``fxquant train`` feeds and scores).

Environment (read each time the file is loaded: **export with the same value as train**):

- ``FXQUANT_TOKENS_PADDED=1``: variable-length sequences, trailing all-zero rows cut and right
  padded with PAD; the wrapper passes ``attention_mask = (ids != PAD_ID)`` to BERT, so padding is
  masked out of attention. Default ``0``: every sequence is 65 tokens and no mask is passed.

Training defaults (:data:`TRAIN`): **AdamW**, lr 3e-3, 60 epochs, batch 32, a linear warm-up of
270 steps (10 % of the 2700) then cosine. Under fxquant's SGD recipe this post-LayerNorm BERT stays
at chance (10 %) at every lr tried (0.01–0.2); without the warm-up, 8-bit training from seed 0
stays at chance for 18 epochs (seed 1 trains): post-LN BERT wants a warm-up (measured,
docs/transformers.md)::

    fxquant train --policy static --bits 8 --optimizer adamw --lr 0.003 --warmup-steps 270 \
        --epochs 60 --batch-size 32 examples/bert_digits.py --out runs/bert
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import DataLoader

from fxquant.torchvision_compat import define_missing_schemas
from fxquant.datasets import PAD_ID, SEQ_LEN, VOCAB_SIZE, digit_tokens, digit_tokens_loaders

DROPOUT = 0.1
TRAIN = {"epochs": 60, "lr": 0.003, "batch_size": 32, "optimizer": "adamw", "warmup_steps": 270}
"""The settings of docs/transformers.md's BERT figures (AdamW, weight decay 0.01, warm-up then
cosine; not fxquant's SGD recipe: see the module docstring)."""


def padded() -> bool:
    return os.environ.get("FXQUANT_TOKENS_PADDED", "0") == "1"


class BertDigits(nn.Module):
    """``forward(ids: int64 (N, 65)) -> logits (N, 10)``; ``self.bert`` is the HF model."""

    def __init__(self, padded: bool) -> None:
        super().__init__()
        define_missing_schemas()  # transformers imports torchvision: see fxquant.torchvision_compat
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=SEQ_LEN, pad_token_id=PAD_ID,
                            hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT, num_labels=10)
        self.padded = padded
        self.bert = BertForSequenceClassification(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids.ne(PAD_ID).to(torch.int64) if self.padded else None
        return self.bert(input_ids=ids, attention_mask=mask).logits


def model() -> nn.Module:
    return BertDigits(padded())


def data(batch_size: int = TRAIN["batch_size"]) -> tuple[DataLoader, DataLoader]:
    return digit_tokens_loaders(batch_size, style="bert", padded=padded())


def example_inputs() -> tuple[torch.Tensor, ...]:
    """The first validation sequence (with padding, the first one that has some)."""
    ids = digit_tokens("bert", padded())[1].ids
    has_pad = ids.eq(PAD_ID).any(dim=1)
    return (ids[int(has_pad.nonzero()[0])][None] if padded() else ids[:1],)
