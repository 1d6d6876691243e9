"""``fxquant.trainer``'s optimizers and schedule: SGD unchanged, AdamW with its weight decay, warm-up then cosine."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fxquant.errors import UsageError
from fxquant.trainer import DEFAULT_WEIGHT_DECAY, TrainOptions, lr_factor, make_optimizer


def lrs(opts: TrainOptions, total: int, steps: int) -> list[float]:
    """The learning rate of each of the first ``steps`` optimizer steps (what the trainer's loop sees)."""
    optimizer, scheduler = make_optimizer(nn.Linear(3, 2), opts, total)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_adamw_with_the_requested_lr_and_weight_decay():
    optimizer, _ = make_optimizer(nn.Linear(3, 2), TrainOptions(optimizer="adamw", lr=3e-3, weight_decay=0.05), 10)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["initial_lr"], group["weight_decay"], group["betas"]) == (3e-3, 0.05, (0.9, 0.999))


@pytest.mark.parametrize("name,decay", [("sgd", 5e-4), ("adamw", 0.01)])
def test_weight_decay_defaults_per_optimizer(name, decay):
    opts = TrainOptions(optimizer=name)
    assert opts.weight_decay == DEFAULT_WEIGHT_DECAY[name] == decay  # resolved: run.json records the number
    optimizer, _ = make_optimizer(nn.Linear(3, 2), opts, 10)
    assert optimizer.param_groups[0]["weight_decay"] == decay


def test_warmup_then_cosine():
    # T = 10, W = 2: steps 0, 1 warm up (0, lr/2), then cosine over the 8 remaining steps
    got = lrs(TrainOptions(optimizer="adamw", lr=0.004, warmup_steps=2), total=10, steps=12)
    expected = [0.0, 0.002, 0.004, 0.004 * 0.5 * (1 + math.cos(math.pi / 8)), None, None, 0.002, None, None, None,
                0.0, 0.0]
    for step, (g, e) in enumerate(zip(got, expected)):
        if e is not None:
            assert g == pytest.approx(e, abs=1e-12), step
    assert got[2:11] == sorted(got[2:11], reverse=True)  # decays monotonically after the warm-up


def test_sgd_is_unchanged():
    """Default options: SGD momentum 0.9 Nesterov, wd 5e-4, and exactly the cosine fxquant always used."""
    total = 7
    optimizer, _ = make_optimizer(nn.Linear(3, 2), TrainOptions(lr=0.05), total)
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)
    old = [0.5 * (1 + math.cos(math.pi * min(s, total) / total)) for s in range(9)]  # the former lambda
    assert [lr_factor(s, total) for s in range(9)] == old  # bit for bit
    assert lrs(TrainOptions(lr=0.05), total, 9) == [0.05 * f for f in old]


def test_warmup_longer_than_the_run():
    assert [lr_factor(s, 4, 8) for s in range(5)] == [0, 1 / 8, 2 / 8, 3 / 8, 4 / 8]


def test_run_json_written_before_the_fields_reads_as_sgd():
    old = {"epochs": 2, "lr": 0.05, "batch_size": 64, "seed": 0, "weight_decay": 5e-4}
    opts = TrainOptions(**old)
    assert (opts.optimizer, opts.warmup_steps, opts.weight_decay) == ("sgd", 0, 5e-4)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"optimizer": "adam"}, "unknown optimizer 'adam'"),
    ({"warmup_steps": -1}, "warmup_steps=-1"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"),
])
def test_bad_options_raise(kwargs, fragment):
    with pytest.raises(UsageError, match=fragment):
        TrainOptions(**kwargs)
