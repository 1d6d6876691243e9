"""Hugging Face GPT2LMHeadModel, tiny config: the digit as the token after its 64 pixel tokens.

Vocabulary: pixel tokens 0..16, then one token per class (17..26); the model's prediction is the
LM head's logits over the class tokens at the last position.
"""

import importlib.util
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

_spec = importlib.util.spec_from_file_location("fxq_digit_tokens", Path(__file__).with_name("digit_tokens.py"))
_tokens = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tokens)

TRAIN, VAL, CLASSES = 256, 128, 10


class NextTokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = GPT2Config(vocab_size=_tokens.LEVELS + CLASSES, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                            n_inner=128, bos_token_id=None, eos_token_id=None)
        self.gpt2 = GPT2LMHeadModel(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt2(input_ids=ids).logits[:, -1, _tokens.LEVELS:]


def model():
    torch.manual_seed(0)
    return NextTokenClassifier()


def example_inputs():
    return (torch.zeros(1, 64, dtype=torch.long),)


def data(batch_size=32):
    t_tr, y_tr, t_va, y_va = _tokens.digit_tokens()
    return (DataLoader(TensorDataset(t_tr[:TRAIN], y_tr[:TRAIN]), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(t_va[:VAL], y_va[:VAL]), batch_size=64))
