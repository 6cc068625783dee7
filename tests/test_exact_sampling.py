"""Exact discrete Laplace / Gaussian draws (integer arithmetic): their laws, unbounded support, and their use for
DP-ZO's scalar releases."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from dplightning.privacy import exact_sampling
from dplightning.privacy.noise_addition import NoiseSource
from dplightning.strategies import DPZOStrategy


def _chi_square_p(draws: list[int], pmf: dict[int, float]) -> float:
    """Goodness of fit of ``draws`` to ``pmf`` (outcomes of tiny expected count pooled into the tails)."""
    support = sorted(k for k, p in pmf.items() if p * len(draws) >= 5)
    lo, hi = support[0], support[-1]
    observed = (
        [sum(d <= lo for d in draws)]
        + [draws.count(k) for k in support[1:-1]]
        + [sum(d >= hi for d in draws)]
    )
    p_lo = sum(p for k, p in pmf.items() if k <= lo)
    p_hi = sum(p for k, p in pmf.items() if k >= hi)
    expected = [p_lo] + [pmf[k] for k in support[1:-1]] + [p_hi]
    expected = [e * len(draws) / sum(expected) for e in expected]
    return float(stats.chisquare(observed, expected).pvalue)


def _pmf(weight: Any, radius: int) -> dict[int, float]:
    raw = {k: weight(k) for k in range(-radius, radius + 1)}
    total = sum(raw.values())
    return {k: w / total for k, w in raw.items()}


@pytest.mark.parametrize("scale", [Fraction(3, 2), Fraction(37, 10)])
def test_discrete_laplace_has_the_exact_law(scale: Fraction) -> None:
    source = NoiseSource(seed=1)
    draws = [exact_sampling.discrete_laplace(scale, source._randbelow) for _ in range(20_000)]
    pmf = _pmf(lambda k: math.exp(-abs(k) / float(scale)), 200)
    assert _chi_square_p(draws, pmf) > 1e-3


@pytest.mark.parametrize("sigma", [Fraction(1, 2), Fraction(23, 10)])
def test_discrete_gaussian_has_the_exact_law(sigma: Fraction) -> None:
    source = NoiseSource(seed=2)
    draws = [exact_sampling.discrete_gaussian(sigma, source._randbelow) for _ in range(20_000)]
    pmf = _pmf(lambda k: math.exp(-(k**2) / (2 * float(sigma) ** 2)), 60)
    assert _chi_square_p(draws, pmf) > 1e-3


@pytest.mark.parametrize("gamma", [Fraction(0), Fraction(3, 10), Fraction(1), Fraction(5, 2)])
def test_bernoulli_exp_has_probability_exp_minus_gamma(gamma: Fraction) -> None:
    rng = np.random.default_rng(3)
    n = 40_000
    hits = sum(exact_sampling.bernoulli_exp(gamma, lambda m: int(rng.integers(m))) for _ in range(n))
    assert stats.binomtest(hits, n, math.exp(-float(gamma))).pvalue > 1e-3


def test_the_support_has_no_end(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force the geometric part (successive exp(-1) coins) to come up 60 times in a row: the draw is then at
    # least 60 scales out, where the float sampler's support (about 37 scales) has long ended.
    real = exact_sampling.bernoulli_exp
    coins = iter([True] * 60 + [False])

    def scripted(gamma: Fraction, randbelow: Any) -> bool:
        return next(coins) if gamma == 1 else real(gamma, randbelow)

    monkeypatch.setattr(exact_sampling, "bernoulli_exp", scripted)
    source = NoiseSource(seed=4)
    draw = exact_sampling.discrete_laplace(Fraction(2**40), source._randbelow)
    assert abs(draw) >= 60 * 2**40
    with pytest.raises(ValueError, match="must be > 0"):
        exact_sampling.discrete_laplace(Fraction(0), source._randbelow)


def test_randbelow_is_uniform_and_covers_large_ranges() -> None:
    source = NoiseSource(seed=5)
    draws = [source._randbelow(6) for _ in range(12_000)]
    assert stats.chisquare(np.bincount(draws, minlength=6)).pvalue > 1e-3
    big = 3 * 2**70 + 1
    values = [source._randbelow(big) for _ in range(200)]
    assert all(0 <= v < big for v in values) and max(values) > 2**70  # more than 52 bits are drawn


def test_seeded_exact_draws_replay_and_secure_ones_do_not() -> None:
    units = torch.arange(5, dtype=torch.int64)
    assert torch.equal(
        NoiseSource(seed=6).add_exact_laplace(units, 9.5), NoiseSource(seed=6).add_exact_laplace(units, 9.5)
    )
    a = NoiseSource(seed=6, secure=True).add_exact_gaussian(units, 1e9)
    b = NoiseSource(seed=6, secure=True).add_exact_gaussian(units, 1e9)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_dpzo_releases_are_drawn_exactly(noise: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Fraction] = []
    sampler = f"discrete_{noise}"
    for name in ("discrete_laplace", "discrete_gaussian"):
        real = getattr(exact_sampling, name)

        def spy(scale: Fraction, randbelow: Any, real: Any = real, name: str = name) -> int:
            if name == sampler:
                calls.append(scale)
            return int(real(scale, randbelow))

        monkeypatch.setattr(exact_sampling, name, spy)
    delta = 0.0 if noise == "laplace" else 1e-5  # pure ε for Laplace
    strategy = DPZOStrategy(
        noise=noise, noise_multiplier=1.0, num_directions=3, target_delta=delta, device="cpu"
    )
    released = strategy.privatize(torch.zeros(3, dtype=torch.int64))
    assert len(calls) == 3 and released.shape == (3,)
    accounted = Fraction(strategy.noise_scale()) / Fraction(strategy.grid)
    assert all(accounted <= scale <= accounted * (1 + Fraction(1, 2**39)) for scale in calls)
