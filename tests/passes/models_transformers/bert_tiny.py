"""Hugging Face BertForSequenceClassification, tiny config, on the digits as 64 pixel tokens.

Tokens are ``pixel + 1`` (1..17); 0 is the padding token, and the attention mask is ``ids != 0``
(computed in the forward, so the model takes token ids only).
"""

import importlib.util
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

_spec = importlib.util.spec_from_file_location("fxq_digit_tokens", Path(__file__).with_name("digit_tokens.py"))
_tokens = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tokens)

TRAIN, VAL, PAD = 256, 128, 0


class BertClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(vocab_size=_tokens.LEVELS + 1, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=64, num_labels=10, pad_token_id=PAD)
        self.bert = BertForSequenceClassification(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids, attention_mask=(ids != PAD).long()).logits


def model():
    torch.manual_seed(0)
    return BertClassifier()


def example_inputs():
    return (torch.ones(1, 64, dtype=torch.long),)


def data(batch_size=32):
    t_tr, y_tr, t_va, y_va = _tokens.digit_tokens(offset=1)
    return (DataLoader(TensorDataset(t_tr[:TRAIN], y_tr[:TRAIN]), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(t_va[:VAL], y_va[:VAL]), batch_size=64))
