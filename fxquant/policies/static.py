"""Static precision: fixed bit widths for all weights/activations (32 = float), FL follows range."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxquant.fixed_point import OFF_BITS, check_bits
from fxquant.policies.base import Policy, set_bits


class StaticPolicy(Policy):
    name = "static"

    def __init__(self, bits: int = 8, act_bits: int | None = None, grad_bits: int = OFF_BITS) -> None:
        super().__init__()
        self.weight_bits = check_bits(bits, "bits")
        self.act_bits = check_bits(act_bits if act_bits is not None else bits, "act_bits")
        self.grad_bits = check_bits(grad_bits, "grad_bits")

    def on_train_begin(self, model: nn.Module, batch: torch.Tensor) -> None:
        set_bits(model, self.weight_bits, self.act_bits, self.grad_bits)
        super().on_train_begin(model, batch)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "bits": self.weight_bits, "act_bits": self.act_bits,
                "grad_bits": self.grad_bits}
