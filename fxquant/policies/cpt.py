"""Cyclic Precision Training (CPT; Fu et al., ICLR 2021).

Forward precision ("FW": weights and activations) cycles between ``B_min`` and ``B_max``;
backward precision ("BW": errors and gradients) is static (``grad_bits``, default 8; the paper's
App. C argues against cycling it). Eq. (1), with ``T = total_steps / N`` the cycle length::

    B_t = round(B_min + 1/2 (B_max - B_min) (1 - cos(pi * (t mod T) / T)))

Paper-reading choices:

* ``t`` counts **optimizer steps**, not epochs: Eq. (1) is written per epoch, but the paper runs
  N = 32 cycles on 160 epochs (5 epochs per cycle) and its Fig. 9 and code step the precision per
  iteration; per step keeps N cycles over any run length. ``T`` is real-valued (no cycle is lost
  to integer division).
* The bracket in Eq. (1) is called "the rounding operation" in the text; we round to nearest,
  ties to even (``round``), so a cycle spends equal time near both bounds.
* ``schedule`` selects the paper's ablation shapes (Tab. 6), all with N cycles, phase
  ``x = (t mod T) / T`` in [0, 1):

  - ``cosine``     (Eq. 1)           ``B_min + (B_max - B_min) (1 - cos(pi x)) / 2``
  - ``triangular`` (Smith 2017)      ``B_min + (B_max - B_min) (1 - |2x - 1|)``: up, then down
  - ``cosine_annealing`` (SGDR-like) ``B_min + (B_max - B_min) (1 + cos(pi x)) / 2``: each cycle
    restarts at ``B_max`` and anneals to ``B_min`` (the learning rate's shape applied to bits)

* Fixed point instead of the paper's range-based (SBM) quantizer: every quantizer's FL follows its
  tensor's range at every step, ``FL = BW - 2 - floor(log2 max|x|)`` (=
  ``BW - 1 - ceil(log2 max|x|)`` off powers of two; :meth:`Policy.follow_ranges`), so a width
  change never saturates and only the resolution moves with ``B_t``.
* The width for step ``t + 1`` is written in ``on_batch_end(t)`` (then the FLs are refitted), so
  the forward of step ``t`` always runs at ``B_t``.
* The quantizer on the graph output (the logits the loss sees) stays at ``B_max``: at 2-3 bits
  the logits collapse to a few multiples of a large step, the cross-entropy and its gradients
  explode and training diverges (observed on the digits CNN with PRT's ``B_min = 2``). The paper
  cycles the layers' weights and activations; it does not discuss the network output.

``B_min`` comes from the precision range test (:mod:`fxquant.policies.prt`) when not given;
``B_max`` defaults to the static counterpart's 8 bits.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from fxquant.errors import UsageError
from fxquant.fixed_point import MAX_BITS, MIN_BITS, FixedPoint, check_bits
from fxquant.policies.base import Policy, output_quantizers, set_bits

DEFAULT_BITS_MAX = 8
DEFAULT_GRAD_BITS = 8
DEFAULT_CYCLES = 32


def _cosine(x: float) -> float:
    return 0.5 * (1.0 - math.cos(math.pi * x))


def _triangular(x: float) -> float:
    return 1.0 - abs(2.0 * x - 1.0)


def _cosine_annealing(x: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * x))


SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine": _cosine, "triangular": _triangular, "cosine_annealing": _cosine_annealing}


def cyclic_bits(step: int, total_steps: int, bits_min: int, bits_max: int, cycles: int = DEFAULT_CYCLES,
                schedule: str = "cosine") -> int:
    """``B_t`` of Eq. (1) (or an ablation shape) at optimizer step ``step`` of ``total_steps``."""
    period = total_steps / cycles
    phase = math.fmod(step, period) / period
    return int(round(bits_min + (bits_max - bits_min) * SCHEDULES[schedule](phase)))


def set_forward_bits(model: nn.Module, bits: int, bits_max: int, grad_bits: int | None = None) -> None:
    """FW width ``bits`` on weights and activations, ``bits_max`` on the graph output (docstring)."""
    set_bits(model, bits, bits, grad_bits)
    for q in output_quantizers(model):
        q.set_format(FixedPoint(bits_max, int(q.frac_bits)))


def check_bounds(bits_min: int | None, bits_max: int) -> None:
    """Raise :class:`UsageError` for bounds outside 2..16 or ``B_min > B_max``."""
    for name, value in (("--bits-min", bits_min), ("--bits-max", bits_max)):
        if value is not None and not (isinstance(value, int) and MIN_BITS <= value <= MAX_BITS):
            raise UsageError(f"{name}={value} is out of range", f"use {MIN_BITS}..{MAX_BITS}")
    if bits_min is not None and bits_min > bits_max:
        raise UsageError(f"--bits-min={bits_min} is above --bits-max={bits_max}",
                         "give B_min <= B_max, or omit --bits-min to run the precision range test")


class CPTPolicy(Policy):
    """Cyclic forward precision, static backward precision; see module docstring."""

    name = "cpt"

    def __init__(self, bits_min: int | None = None, bits_max: int = DEFAULT_BITS_MAX, cycles: int = DEFAULT_CYCLES,
                 schedule: str = "cosine", grad_bits: int = DEFAULT_GRAD_BITS, total_steps: int | None = None) -> None:
        super().__init__()
        check_bounds(bits_min, bits_max)
        if bits_min is None:
            raise UsageError("cpt needs --bits-min", "run `fxquant prt MODEL_PY`, or let `fxquant train` run it")
        if schedule not in SCHEDULES:
            raise UsageError(f"unknown CPT schedule {schedule!r}", f"choose one of {', '.join(SCHEDULES)}")
        if not isinstance(cycles, int) or cycles < 1:
            raise UsageError(f"--cycles={cycles} must be a positive integer")
        self.bits_min, self.bits_max, self.cycles, self.schedule = bits_min, bits_max, cycles, schedule
        self.grad_bits = check_bits(grad_bits, "grad_bits")
        self.total_steps = total_steps

    @property
    def reference_bits(self) -> int:
        return self.bits_max

    def bits_at(self, step: int) -> int:
        if self.total_steps is None:
            raise UsageError("CPT does not know the run length", "call policy.plan(total_steps) before training")
        return cyclic_bits(min(step, self.total_steps - 1), self.total_steps, self.bits_min, self.bits_max,
                           self.cycles, self.schedule)

    def on_train_begin(self, model: nn.Module, batch: torch.Tensor) -> None:
        set_forward_bits(model, self.bits_at(0), self.bits_max, self.grad_bits)
        super().on_train_begin(model, batch)

    def on_batch_end(self, step: int, loss: float, model: nn.Module) -> None:
        set_forward_bits(model, self.bits_at(step + 1), self.bits_max)
        self.follow_ranges(model)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "bits_min": self.bits_min, "bits_max": self.bits_max, "cycles": self.cycles,
                "schedule": self.schedule, "grad_bits": self.grad_bits}
