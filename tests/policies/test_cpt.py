"""CPT: Eq. (1) and its ablation shapes against hand-computed values; the policy's buffer writes."""

from __future__ import annotations

import math

import pytest

from fxquant.errors import UsageError
from fxquant.policies import make_policy
from fxquant.policies.cpt import CPTPolicy, cyclic_bits
from fxquant.quantizers import WEIGHT, quantizers


# total 100 steps, N = 2 cycles -> T = 50; FW(3, 8)
@pytest.mark.parametrize("step, expected", [
    (0, 3),    # cos 0 = 1 -> B_min
    (10, 3),   # 3 + 5 * (1 - cos(0.2 pi)) / 2 = 3.477
    (25, 6),   # 3 + 2.5 = 5.5 -> round half even -> 6
    (40, 8),   # 3 + 5 * (1 - cos(0.8 pi)) / 2 = 7.523
    (49, 8),   # 3 + 5 * (1 - cos(0.98 pi)) / 2 = 7.995
    (50, 3),   # second cycle restarts at B_min
    (60, 3),
    (90, 8),
])
def test_cosine_schedule_matches_eq1(step: int, expected: int) -> None:
    assert cyclic_bits(step, 100, 3, 8, cycles=2) == expected


def test_triangular_and_cosine_annealing_shapes() -> None:
    assert [cyclic_bits(s, 100, 3, 8, 2, "triangular") for s in (0, 10, 25, 40)] == [3, 5, 8, 5]  # 3 + 5 * 0.4 = 5
    assert [cyclic_bits(s, 100, 3, 8, 2, "cosine_annealing") for s in (0, 10, 25, 40, 50)] == [8, 8, 6, 3, 8]


def test_default_32_cycles_over_the_run() -> None:
    bits = [cyclic_bits(s, 3200, 2, 8) for s in range(3200)]
    assert sum(1 for a, b in zip(bits, bits[1:]) if b < a) == 31  # 32 cycles -> 31 restarts
    assert min(bits) == 2 and max(bits) == 8


def test_policy_writes_bits_and_fits_ranges(tiny, batch) -> None:
    policy = CPTPolicy(bits_min=3, bits_max=8, cycles=2)
    policy.plan(100)
    policy.on_train_begin(tiny, batch)
    for step in range(30):
        tiny(batch)
        policy.on_batch_end(step, 1.0, tiny)
        # Eq. (1) written out: T = 100 steps / 2 cycles = 50, B = round(3 + 5 (1 - cos(pi (t mod T) / T)) / 2)
        t = step + 1
        want = round(3 + 5 * (1 - math.cos(math.pi * (t % 50) / 50)) / 2)
        for (layer, role), q in quantizers(tiny).items():
            assert int(q.bits) == (8 if layer == "fc" and role != WEIGHT else want) and int(q.grad_bits) == 8
            if role == WEIGHT:  # FL = BW - 2 - floor(log2 max|w|); frexp: max|w| = f 2^e, 0.5 <= f < 1
                assert int(q.frac_bits) == want - 2 - (math.frexp(float(q.amax))[1] - 1)


def test_reference_bits_is_bits_max() -> None:
    assert CPTPolicy(bits_min=2, bits_max=6).reference_bits == 6


@pytest.mark.parametrize("options", [
    {"bits_min": 6, "bits_max": 4},
    {"bits_min": 1, "bits_max": 8},
    {"bits_min": 3, "bits_max": 17},
    {"bits_min": 3, "schedule": "sawtooth"},
    {"bits_min": 3, "cycles": 0},
    {},
])
def test_bad_options_raise_usage_error(options) -> None:
    with pytest.raises(UsageError):
        make_policy("cpt", **options)


def test_unknown_policy() -> None:
    with pytest.raises(UsageError, match="unknown policy"):
        make_policy("cyclic")


def test_state_round_trip() -> None:
    a = CPTPolicy(bits_min=3)
    a.act_range = {"conv": 1.5}
    b = CPTPolicy(bits_min=3)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError):
        b.load_state_dict({"name": "adapt"})
    assert math.isclose(b.act_range["conv"], 1.5)
