"""A probing forward that leaves no trace: one place for capture, shape folding and the census."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_probe(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the body; afterwards its mode is restored, and so is every buffer
    the forward touched (BatchNorm statistics, quantizer ranges)."""
    saved = {name: b.clone() for name, b in module.named_buffers()}
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in saved:
                    b.copy_(saved[name])
