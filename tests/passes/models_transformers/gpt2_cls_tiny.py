"""Hugging Face GPT2ForSequenceClassification, tiny config, on the digits as 64 pixel tokens.

The classifier reads the last non-padding token; the padding token (17) never occurs in the data.
"""

import importlib.util
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2ForSequenceClassification

_spec = importlib.util.spec_from_file_location("fxq_digit_tokens", Path(__file__).with_name("digit_tokens.py"))
_tokens = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tokens)

TRAIN, VAL, PAD = 256, 128, 17


class GPT2Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = GPT2Config(vocab_size=_tokens.LEVELS + 1, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                            n_inner=128, num_labels=10, pad_token_id=PAD,
                            bos_token_id=PAD, eos_token_id=PAD)
        self.gpt2 = GPT2ForSequenceClassification(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt2(input_ids=ids).logits


def model():
    torch.manual_seed(0)
    return GPT2Classifier()


def example_inputs():
    return (torch.zeros(1, 64, dtype=torch.long),)


def data(batch_size=32):
    t_tr, y_tr, t_va, y_va = _tokens.digit_tokens()
    return (DataLoader(TensorDataset(t_tr[:TRAIN], y_tr[:TRAIN]), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(t_va[:VAL], y_va[:VAL]), batch_size=64))
