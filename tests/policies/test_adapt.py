"""AdaPT: gradient diversity and push-up on synthetic gradients, strategy, lookback, state, budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fxquant.errors import UsageError
from fxquant.fixed_point import FixedPoint
from fxquant.policies.adapt import (AdaPTPolicy, gradient_diversity, next_strategy, push_up, push_up_step)
from fxquant.quantizers import WEIGHT, quantizers


def _diversity(grads: list[torch.Tensor]) -> float:
    total = sum(g / g.norm() for g in grads)
    return gradient_diversity(float(total.norm()), len(grads))


def test_gradient_diversity_of_synthetic_gradients() -> None:
    g = torch.tensor([3.0, 4.0])
    assert _diversity([g, 2 * g, 5 * g]) == pytest.approx(1.0)           # aligned: no diversity
    eye = torch.eye(16)
    assert _diversity(list(eye)) == pytest.approx(4.0)                    # orthogonal: sqrt(lb)
    assert _diversity([g, -g]) == math.inf                                # cancelling


@pytest.mark.parametrize("strategy, s", [("min", 4), ("mean", 5), ("max", 5)])
def test_push_up_step_hand_values(strategy: str, s: int) -> None:
    # ln(ds) - 1 = 0.5: s1 = ceil(1 / 0.25) = 4, s2 = max(min(ceil(32 * 0.25), 32) - FL_min, 1) = 8 - 3 = 5
    assert push_up_step(math.exp(1.5), 3, strategy) == s


def test_push_up_step_low_diversity_is_one() -> None:
    assert push_up_step(1.0, 3, "max") == 1
    assert push_up_step(math.e, 3, "max") == 1
    assert push_up_step(math.inf, 3, "max") == 1


def test_push_up_with_buffer_bits() -> None:
    # FL = 4 + 4 = 8, BW = max(6, 8) + 1 = 9; buffer 8: FL = min(8, 24) = 8, BW = max(min(16, 32), 9) = 16
    assert push_up(FixedPoint(6, 4), math.exp(1.5), "min", 8) == (16, 8)
    assert push_up(FixedPoint(6, 4), 1.0, "min", 0) == (7, 5)  # s = 1: FL 5, BW = max(6, 5) + 1


def test_strategy_follows_the_loss_trend() -> None:
    assert next_strategy("max", loss_avg=1.0, loss=0.5) == "min"
    assert next_strategy("min", loss_avg=1.0, loss=1.5) == "mean"
    assert next_strategy("mean", loss_avg=1.0, loss=1.5) == "max"
    assert next_strategy("max", loss_avg=1.0, loss=1.5) == "max"


def _drive(policy: AdaPTPolicy, model, batch, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        policy.on_batch_begin(step, model)
        model(batch)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        policy.before_step(model)
        policy.on_batch_end(step, 1.0 + 0.1 * math.sin(step), model)


def test_initial_formats_and_first_switch(tiny, batch) -> None:
    policy = AdaPTPolicy(lb_min=4, lb_max=8)
    policy.on_train_begin(tiny, batch)
    qs = quantizers(tiny)
    assert all(q.fmt == FixedPoint(8, 4) for (_, role), q in qs.items() if role == WEIGHT)
    assert all(int(q.bits) == 8 for (_, role), q in qs.items() if role != WEIGHT)
    _drive(policy, tiny, batch, 4)
    for layer, st in policy.layers.items():
        q = qs[(layer, WEIGHT)]
        assert st["count"] == 0 and q.fmt == FixedPoint(st["bits"], st["frac_bits"])
        assert q.fmt != FixedPoint(8, 4)
        assert int(q.grad_bits) == max(st["bits"], 8)
        assert bool(q.stochastic)  # on for training; quantizers round to nearest in eval regardless
        # random gradients: diversity ~ sqrt(4) = 2 -> lb_new = ceil(8 / 2) ~ 4..5; lb = ceil(.33 lb_new + .67 * 4)
        assert st["lb"] in (4, 5)


def test_aligned_gradients_lengthen_the_lookback(tiny, batch) -> None:
    policy = AdaPTPolicy(lb_min=25, lb_max=100)
    policy.on_train_begin(tiny, batch)
    for step in range(25):
        for p in tiny.parameters():
            p.grad = torch.ones_like(p)
        policy.before_step(tiny)
        policy.on_batch_end(step, 1.0, tiny)
    # diversity 1 -> lb_new = 100, lb = ceil(100 * 0.33 + 0.67 * 25) = ceil(49.75) = 50
    assert all(st["lb"] == 50 for st in policy.layers.values())


def test_state_dict_round_trip_continues_identically(tiny, batch) -> None:
    a = AdaPTPolicy(lb_min=3, lb_max=6)
    a.on_train_begin(tiny, batch)
    _drive(a, tiny, batch, 5)
    state = a.state_dict()
    b = AdaPTPolicy(lb_min=3, lb_max=6)
    b.load_state_dict(state)
    snapshot = {k: v.clone() for k, v in tiny.state_dict().items()}
    _drive(a, tiny, batch, 7, seed=5)
    fmts_a = {k: q.fmt for k, q in quantizers(tiny).items()}
    tiny.load_state_dict(snapshot)
    _drive(b, tiny, batch, 7, seed=5)
    assert {k: q.fmt for k, q in quantizers(tiny).items()} == fmts_a
    assert a.strategy == b.strategy and a.losses == b.losses


def test_trim_and_budget(tiny, batch) -> None:
    faithful, trimmed = AdaPTPolicy(lb_min=2, lb_max=4), AdaPTPolicy(lb_min=2, lb_max=4, trim=True)
    budget = AdaPTPolicy(lb_min=2, lb_max=4, bits_budget=4)
    results = []
    for policy in (faithful, trimmed, budget):
        snapshot = {k: v.clone() for k, v in tiny.state_dict().items()}
        policy.on_train_begin(tiny, batch)
        _drive(policy, tiny, batch, 40)
        results.append(policy._mean_weight_bits())
        for layer, st in policy.layers.items():
            w = tiny.get_parameter(f"{layer}.weight").detach().numpy().astype(np.float64)
            if policy.trim and not st["capped"]:  # lossless: every weight fits its format, no saturation
                q = np.rint(np.ldexp(w, st["frac_bits"]))
                assert q.max() <= 2 ** (st["bits"] - 1) - 1 and q.min() >= -(2 ** (st["bits"] - 1))
        tiny.load_state_dict(snapshot)
    assert results[0] >= results[1] >= results[2]
    assert results[2] <= 4.0


@pytest.mark.parametrize("options", [{"lb_min": 10, "lb_max": 5}, {"gamma": 1.5}, {"buff": -1},
                                     {"bits_budget": 1}, {"init_bits": 32}, {"res_min": 0}, {"l1": -1.0}])
def test_bad_options(options) -> None:
    with pytest.raises(UsageError):
        AdaPTPolicy(**options)


def test_trim_reaches_the_deployed_weights(tiny, batch) -> None:
    policy = AdaPTPolicy(trim=True)
    policy.on_train_begin(tiny, batch)
    for (layer, role), q in quantizers(tiny).items():
        if role == WEIGHT:
            q.set_format(FixedPoint(16, 7))  # |w| < 1 at FL 7 needs at most 8 bits
    policy.on_train_end(tiny)
    for (layer, role), q in quantizers(tiny).items():
        if role == WEIGHT:
            w = tiny.get_parameter(f"{layer}.weight").detach().numpy().astype(np.float64)
            # fewest signed bits holding every rint(w * 2^7): n >= 0 needs bit_length(n) + 1, n < 0 bit_length(-n - 1) + 1
            ints = [int(n) for n in np.rint(w * 2.0**7).ravel()]
            need = max(max(n if n >= 0 else -n - 1 for n in ints).bit_length() + 1, 2)
            assert q.fmt == FixedPoint(need, 7) and q.fmt.bits <= 8


def test_budget_is_enforced_on_the_deployed_model(tiny, batch) -> None:
    from fxquant.policies.base import mean_bits

    policy = AdaPTPolicy(bits_budget=4.5)
    policy.on_train_begin(tiny, batch)
    for (layer, role), q in quantizers(tiny).items():
        if role == WEIGHT:
            q.set_format(FixedPoint(16, 12))
    policy.on_train_end(tiny)
    assert mean_bits(tiny, WEIGHT) <= 4.5
    assert all(q.fmt.bits <= 4 for (_, role), q in quantizers(tiny).items() if role == WEIGHT)


class _Attention(torch.nn.Module):
    """nn.MultiheadAttention (one packed in_proj_weight; head dim 6: 1/sqrt(6) folded into q's rows)
    and a Hugging Face Conv1D-style addmm (weight stored (in, out)) into a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(12, 2, batch_first=True)
        self.w = torch.nn.Parameter(torch.randn(12, 12) * 0.1)
        self.b = torch.nn.Parameter(torch.zeros(12))
        self.fc = torch.nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, x, x, need_weights=False)
        h = torch.addmm(self.b, a.reshape(-1, 12), self.w).reshape(a.shape)
        return self.fc(h[:, 0])


def test_adapt_finds_the_parameter_behind_each_weight_quantizer() -> None:
    """The layer name is not always ``<param owner>.weight`` (a packed in_proj_weight, a transposed
    Conv1D weight, a folded scale): AdaPT binds the parameter the quantizer reads, and measures the
    tensor the quantizer sees."""
    from fxquant.passes import InsertQuantizers, capture
    from fxquant.quantizers import weight_inputs

    torch.manual_seed(0)
    gm = capture(_Attention(), (torch.randn(2, 5, 12),))
    InsertQuantizers()(gm)
    x = torch.randn(8, 5, 12)
    sources = weight_inputs(gm)
    params = dict(gm.named_parameters())
    names = {layer: name for layer, (name, _) in sources.items()}
    assert set(names.values()) == {"attn.in_proj_weight", "attn.out_proj.weight", "w", "fc.weight"}
    seen = {}
    hooks = [q.register_forward_hook(lambda m, i, o, k=k: seen.setdefault(k, i[0].detach().clone()))
             for (k, role), q in quantizers(gm).items() if role == WEIGHT]
    gm(x)
    for h in hooks:
        h.remove()
    for layer, (name, value) in sources.items():
        assert torch.equal(value(), seen[layer]), layer  # what the weight quantizer reads
    in_proj = next(layer for layer, n in names.items() if n == "attn.in_proj_weight")
    scale = torch.ones(36, 1)
    scale[:12] = 1 / math.sqrt(6)
    torch.testing.assert_close(sources[in_proj][1](), params["attn.in_proj_weight"] * scale)
    policy = AdaPTPolicy(lb_min=2, lb_max=4)
    policy.plan(4)
    gm.train()
    policy.on_train_begin(gm, x)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    for step in range(4):
        policy.on_batch_begin(step, gm)
        torch.nn.functional.cross_entropy(gm(x), torch.arange(8) % 3).backward()
        policy.before_step(gm)
        opt.step()
        opt.zero_grad()
        policy.on_batch_end(step, 1.0, gm)
    assert set(policy.layers) == set(names)
