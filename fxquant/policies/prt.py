"""Precision Range Test (PRT; CPT paper Sec. 3.3), automated.

The paper: "PRT starts from the lowest possible precision, e.g. 2-bit, and gradually increases the
precision while monitoring the difference in the training accuracy magnitude averaged over
several consecutive iterations; once this training accuracy difference is larger than a preset
threshold, indicating that the training can at least partially converge, PRT would claim that the
lower bound is identified". ``B_max`` is the static counterpart's width unless given.

Our reading, as an algorithm (a learning-rate range test over bits): one fresh copy of the model
trains with constant learning rate, forward width ``b = 2, 3, …, B_max`` for ``steps_per_level``
optimizer steps each (backward static at ``grad_bits``, FL following ranges as in CPT), the same
network continuing from level to level. For each level the **improvement** is::

    delta_b = mean(acc of the level's last `window` steps) - mean(acc of its first `window` steps)

(training accuracy of each step's batch, in percentage points); as in CPT the graph output stays at
``B_max`` (:func:`fxquant.policies.cpt.set_forward_bits`). ``B_min`` is the first ``b`` with
``delta_b > threshold``; if no level qualifies, ``B_min = B_max`` (static training). The test
stops at the first qualifying level, so it costs at most ``(B_min - 1) * steps_per_level`` steps
and runs on a throw-away copy: the real run starts from the same initial weights (same seed).
Defaults (the paper gives none): 40 steps per level, window 10, threshold 10 pp.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fxquant.errors import TrainingError, UsageError
from fxquant.fixed_point import MIN_BITS
from fxquant.model_file import ModelFile
from fxquant.policies.base import Policy, calibrate
from fxquant.policies.cpt import DEFAULT_BITS_MAX, DEFAULT_GRAD_BITS, check_bounds, set_forward_bits
from fxquant.quantized_graph import build_quantized_graph
from fxquant.rng import rng_state, seed_everything, set_rng_state

DEFAULT_STEPS_PER_LEVEL = 40
DEFAULT_WINDOW = 10
DEFAULT_THRESHOLD = 10.0


def check_prt_options(steps_per_level: int = DEFAULT_STEPS_PER_LEVEL, window: int = DEFAULT_WINDOW,
                      threshold: float = DEFAULT_THRESHOLD) -> None:
    """Raise :class:`UsageError` unless ``1 <= window`` and ``steps_per_level >= 2 * window``."""
    if not (isinstance(window, int) and isinstance(steps_per_level, int) and 1 <= window
            and steps_per_level >= 2 * window):
        raise UsageError(f"PRT needs --prt-steps >= 2 * --prt-window >= 2 (got {steps_per_level}, {window})",
                         "for example --prt-steps 40 --prt-window 10")
    if not math.isfinite(threshold):
        raise UsageError(f"--prt-threshold={threshold} is not a finite number of percentage points")


def level_improvement(accs: Sequence[float], window: int) -> float:
    """Mean of the last ``window`` accuracies minus mean of the first ``window``."""
    check_prt_options(len(accs), window)
    return sum(accs[-window:]) / window - sum(accs[:window]) / window


def find_bits_min(levels: Sequence[tuple[int, Sequence[float]]], window: int, threshold: float) -> int | None:
    """The first level's width whose improvement exceeds ``threshold``, else ``None``."""
    for bits, accs in levels:
        if level_improvement(accs, window) > threshold:
            return bits
    return None


@dataclass
class PRTResult:
    bits_min: int
    bits_max: int
    threshold: float
    window: int
    steps_per_level: int
    improvement: dict[str, float] = field(default_factory=dict)
    curve: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_prt(mf: ModelFile, bits_max: int = DEFAULT_BITS_MAX, grad_bits: int = DEFAULT_GRAD_BITS,
            steps_per_level: int = DEFAULT_STEPS_PER_LEVEL, window: int = DEFAULT_WINDOW,
            threshold: float = DEFAULT_THRESHOLD, lr: float = 0.05, batch_size: int = 64, seed: int = 0,
            weight_decay: float = 5e-4) -> PRTResult:
    """Run the test on a fresh copy of ``mf``'s model (module docstring); RNG state is restored."""
    check_bounds(None, bits_max)
    check_prt_options(steps_per_level, window, threshold)
    saved_rng = rng_state()
    seed_everything(seed)
    train_loader, _ = mf.data(batch_size)
    model = build_quantized_graph(mf)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    ranges = Policy()
    batches = itertools.chain.from_iterable(iter(train_loader) for _ in itertools.count())
    first_x, _ = next(iter(train_loader))
    calibrate(model, first_x)
    result = PRTResult(bits_max, bits_max, threshold, window, steps_per_level)
    for bits in range(MIN_BITS, bits_max + 1):
        set_forward_bits(model, bits, bits_max, grad_bits)
        ranges.follow_ranges(model)
        accs = []
        for _ in range(steps_per_level):
            x, y = next(batches)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            if not math.isfinite(loss.item()):
                raise TrainingError(f"precision range test: loss is {loss.item()} at {bits} bits",
                                    "lower --lr, or give --bits-min to skip the test")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ranges.follow_ranges(model)
            accs.append(100.0 * float((logits.argmax(1) == y).float().mean()))
        result.curve[str(bits)] = accs
        result.improvement[str(bits)] = level_improvement(accs, window)
        if find_bits_min([(bits, accs)], window, threshold) is not None:
            result.bits_min = bits
            break
    set_rng_state(saved_rng)
    return result
