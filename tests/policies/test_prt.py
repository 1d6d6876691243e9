"""PRT on synthetic training-accuracy curves."""

from __future__ import annotations

import numpy as np
import pytest

from fxquant.errors import UsageError
from fxquant.policies.prt import find_bits_min, level_improvement


def _level(start: float, end: float, n: int = 40, noise: float = 2.0, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(np.linspace(start, end, n) + rng.normal(0, noise, n))


def test_level_improvement_hand_value() -> None:
    accs = [10.0] * 5 + [20.0] * 10 + [40.0] * 5
    assert level_improvement(accs, 5) == pytest.approx(30.0)


def test_first_level_over_threshold_is_bits_min() -> None:
    levels = [(2, _level(10, 11, seed=1)), (3, _level(11, 13, seed=2)), (4, _level(13, 60, seed=3)),
              (5, _level(60, 90, seed=4))]
    assert find_bits_min(levels, window=10, threshold=10.0) == 4


def test_noise_alone_does_not_trigger() -> None:
    levels = [(b, _level(10, 10, noise=3.0, seed=b)) for b in range(2, 9)]
    assert find_bits_min(levels, window=10, threshold=10.0) is None


def test_threshold_moves_the_bound() -> None:
    levels = [(2, _level(10, 18, noise=0.0)), (3, _level(18, 50, noise=0.0))]
    assert find_bits_min(levels, window=10, threshold=5.0) == 2
    assert find_bits_min(levels, window=10, threshold=10.0) == 3


def test_short_levels_are_rejected() -> None:
    with pytest.raises(UsageError):
        level_improvement([1.0, 2.0, 3.0], window=2)
