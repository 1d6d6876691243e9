"""The 10-line training loop of docs/policies.md drives every policy (no fxquant trainer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxquant.policies import make_policy
from fxquant.policies.base import mean_bits
from fxquant.quantizers import WEIGHT


@pytest.mark.parametrize("name, options", [("static", {"bits": 6}), ("cpt", {"bits_min": 3, "bits_max": 8}),
                                           ("adapt", {"lb_min": 2, "lb_max": 4})])
def test_documented_loop(name, options, tiny) -> None:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    epochs, gm = 2, tiny
    # --- the loop from docs/policies.md ---
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    policy = make_policy(name, **options)
    policy.plan(epochs * len(data))
    policy.on_train_begin(gm, data[0][0])
    step = 0
    for epoch in range(epochs):
        for x, y in data:
            policy.on_batch_begin(step, gm)
            loss = F.cross_entropy(gm(x), y)
            extra = policy.loss_terms(gm)
            opt.zero_grad()
            (loss if extra is None else loss + extra).backward()
            policy.before_step(gm)
            opt.step()
            policy.on_batch_end(step, loss.item(), gm)
            step += 1
        policy.on_epoch_end(epoch, gm)
    # ---
    assert torch.isfinite(loss)
    assert 2 <= mean_bits(gm, WEIGHT) <= 16
