"""Seeding and saving/restoring every RNG training draws from (Python ``random``, NumPy, torch CPU).

:func:`rng_state` returns tensors and plain data only, so a checkpoint holding it loads with
``torch.load(..., weights_only=True)``; :func:`set_rng_state` is its exact inverse (the NumPy
MT19937 key travels as int64 and comes back as uint32).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain data (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(), "python": list(py_state[1]) + [py_state[2]],
            "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((3, tuple(py[:-1]), py[-1]))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))


__all__ = ["rng_state", "seed_everything", "set_rng_state"]
