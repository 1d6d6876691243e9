"""The policy interface and the shared range-following rule.

A policy is driven by training events and writes precisions into the quantizers' buffers (it
never retraces). Events, in order::

    plan(total_steps)              once, before on_train_begin (and again on resume)
    on_train_begin(model, batch)   once, after calibration data is available
    on_batch_begin(step, model)    before each forward
    loss_terms(model)              extra loss added to the task loss (regularisers), or None
    before_step(model)             after backward, before the optimizer step
    on_batch_end(step, loss, model) after each optimizer step
    on_epoch_end(epoch, model)     after each epoch's validation
    on_train_end(deployed)         once, on the deployed model (BN folded, FLs refitted), before
                                   its precision map is written

``reference_bits`` is the weight/activation width of the policy's static counterpart (the
denominator of the "BitOPs vs static" ratio, :mod:`fxquant.bitops`); ``None`` means the widths the
run starts with (a static policy is its own counterpart).

``state_dict()`` / ``load_state_dict()`` hold everything a resumed run needs to continue
identically (plain numbers, lists, dicts and tensors: loadable with ``weights_only=True``).

**Range following** (all policies): a quantizer's FL tracks its tensor's range,
``FL = fit_frac_bits(m, BW)`` with ``m`` the last-seen ``max|x|`` for weights and an exponential
moving maximum ``m <- max(amax, momentum * m)`` for activations (an activation's range moves from
batch to batch; the moving maximum avoids a jittering FL). This is CPT's "FL per layer follows
the tensor's range at each step".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from fxquant.fixed_point import OFF_BITS, FixedPoint, fit_frac_bits
from fxquant.quantizers import ACT, WEIGHT, FixedPointQuantizer, quantizers

ACT_RANGE_MOMENTUM = 0.9


class Policy:
    """Base class: no-op events, range following, calibration, (de)serialization."""

    name = "base"

    def __init__(self) -> None:
        self.act_range: dict[str, float] = {}
        self.total_steps: int | None = None

    @property
    def reference_bits(self) -> int | None:
        """Bits of the static counterpart; ``None``: the widths the run starts with."""
        return None

    # ------------------------------------------------------------------ events
    def plan(self, total_steps: int) -> None:
        """The run's length in optimizer steps (schedules over the whole run need it)."""
        self.total_steps = int(total_steps)

    def on_train_begin(self, model: nn.Module, batch: torch.Tensor) -> None:
        calibrate(model, batch)
        self.follow_ranges(model)

    def on_batch_begin(self, step: int, model: nn.Module) -> None:
        pass

    def loss_terms(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def before_step(self, model: nn.Module) -> None:
        pass

    def on_batch_end(self, step: int, loss: float, model: nn.Module) -> None:
        self.follow_ranges(model)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        pass

    def on_train_end(self, deployed: nn.Module) -> None:
        pass

    # ------------------------------------------------------------------ helpers
    def follow_ranges(self, model: nn.Module, roles: tuple[str, ...] = (WEIGHT, ACT),
                      qs: dict[tuple[str, str], FixedPointQuantizer] | None = None) -> None:
        """Set the FL of every active quantizer with a role in ``roles`` from its range (see above).

        ``qs`` is ``quantizers(model)`` when the caller keeps it (saves a module walk per step).
        """
        for (layer, role), q in (qs if qs is not None else quantizers(model)).items():
            bits = int(q.bits)
            if bits >= OFF_BITS or role not in roles:
                continue
            m = float(q.amax)
            if role == ACT:
                key = layer
                m = max(m, ACT_RANGE_MOMENTUM * self.act_range.get(key, m))
                self.act_range[key] = m
            q.frac_bits.fill_(fit_frac_bits(m, bits))

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "act_range": dict(self.act_range)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state of another policy raises ``ValueError``."""
        if state.get("name") != self.name:
            raise ValueError(f"policy state is for {state.get('name')!r}, this run uses {self.name!r}")
        self.act_range = dict(state.get("act_range", {}))

    def describe(self) -> dict[str, Any]:
        """Options of this policy, recorded in run.json."""
        return {"policy": self.name}


def output_quantizers(model: nn.Module) -> list[FixedPointQuantizer]:
    """The activation quantizers whose values are graph outputs (the logits the loss sees)."""
    if not isinstance(model, fx.GraphModule):
        return []
    out = []
    for node in model.graph.nodes:
        if node.op != "output":
            continue
        for arg in node.all_input_nodes:
            module = model.get_submodule(str(arg.target)) if arg.op == "call_module" else None
            if isinstance(module, FixedPointQuantizer):
                out.append(module)
    return out


def set_bits(model: nn.Module, weight_bits: int | None = None, act_bits: int | None = None,
             grad_bits: int | None = None) -> None:
    """Set bit widths of all quantizers (FL is then fitted by range following)."""
    for (_, role), q in quantizers(model).items():
        bits = weight_bits if role == WEIGHT else act_bits
        if bits is not None:
            q.set_format(FixedPoint(bits, int(q.frac_bits)))
        if grad_bits is not None:
            q.set_grad_bits(grad_bits)


@torch.no_grad()
def calibrate(model: nn.Module, batch: torch.Tensor) -> None:
    """One float forward (quantizers temporarily off) to record every tensor's range in ``amax``.

    The forward runs **in the model's own mode**: a model about to train (the trainer, the range
    test) is calibrated with BatchNorm's *batch* statistics, the ranges its training steps see.
    (Calibrating a training model in eval mode normalizes with the running statistics BN starts
    with, mean 0 and variance 1: no normalization at all, so every range after a BN is the raw
    conv output's, 1e-13 or 1e9 deep in a torchvision model, and the first training steps
    saturate every quantizer — zero straight-through gradients and a flat loss at ln(classes),
    or values on a grid whose step is larger than they are.) BN's running statistics and the
    RNG (dropout, stochastic depth) are restored afterwards: calibration changes only ``amax``.
    """
    qs = list(quantizers(model).values())
    saved = [int(q.bits) for q in qs]
    for q in qs:
        q.bits.fill_(OFF_BITS)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    buffers = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in bns]
    rng = torch.random.get_rng_state()
    try:
        model(batch)
    finally:
        torch.random.set_rng_state(rng)
        for m, saved_buffers in zip(bns, buffers):
            for k, b in saved_buffers.items():
                getattr(m, k).copy_(b)
        for q, bits in zip(qs, saved):
            q.bits.fill_(bits)


def mean_bits(model: nn.Module, role: str, qs: dict[tuple[str, str], FixedPointQuantizer] | None = None) -> float:
    """Parameter-weighted mean weight bits (role ``weight``) or plain mean act bits.

    ``qs`` is ``quantizers(model)`` when the caller keeps it (saves a module walk per step).
    """
    total, count = 0.0, 0.0
    params = dict(model.named_parameters())
    for (layer, r), q in (qs if qs is not None else quantizers(model)).items():
        if r != role:
            continue
        n = params[f"{layer}.weight"].numel() if role == WEIGHT and f"{layer}.weight" in params else 1
        total += int(q.bits) * n
        count += n
    return total / count if count else float(OFF_BITS)


__all__ = ["Policy", "calibrate", "set_bits", "mean_bits", "output_quantizers"]
