"""Direct unit tests of privacy building blocks: the Poisson sampler and the RLDP budget guard."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dplightning.privacy.accounting import StepEvent, make_accountant
from dplightning.privacy.batch_selection import PoissonBatchSampler
from dplightning.privacy.budget_guard import BudgetGuard


# ------------------------------------------------------------------------------------------ Poisson sampler
def test_each_example_joins_a_batch_with_probability_q() -> None:
    n, q, batches = 2000, 0.05, 200
    sampler = PoissonBatchSampler(n, q, num_batches=batches, seed=3)
    counts = np.zeros(n)
    sizes = []
    for i in range(batches):
        chosen = sampler.logical_batch(i)
        counts[chosen] += 1
        sizes.append(len(chosen))
    # Inclusion rate per example ≈ q; batch sizes ≈ Binomial(n, q) (mean nq, variance nq(1 − q)).
    assert counts.mean() / batches == pytest.approx(q, rel=0.02)
    assert np.mean(sizes) == pytest.approx(n * q, rel=0.02)
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.25)
    # Independence across examples: no example is far more frequent than Binomial(batches, q) allows.
    assert counts.max() <= batches * q + 6 * math.sqrt(batches * q * (1 - q))


def test_ddp_shards_are_a_partition_of_the_single_process_batch() -> None:
    single = PoissonBatchSampler(500, 0.1, seed=7)
    for index in range(5):
        whole = set(single.logical_batch(index).tolist())
        shards = [
            set(PoissonBatchSampler(500, 0.1, seed=7, rank=r, world_size=3).logical_batch(index).tolist())
            for r in range(3)
        ]
        assert set().union(*shards) == whole
        assert sum(len(s) for s in shards) == len(whole)  # disjoint


def test_a_new_epoch_draws_new_masks_and_an_epoch_replays_identically() -> None:
    sampler = PoissonBatchSampler(400, 0.1, num_batches=4, seed=1)
    first = [sampler.logical_batch(i).tolist() for i in range(4)]
    sampler.set_epoch(1)
    second = [sampler.logical_batch(i).tolist() for i in range(4)]
    assert all(a != b for a, b in zip(first, second))
    sampler.set_epoch(0)
    assert [sampler.logical_batch(i).tolist() for i in range(4)] == first  # counter-based: resume-safe


def test_micro_batches_split_one_logical_batch() -> None:
    sampler = PoissonBatchSampler(300, 0.2, num_batches=3, seed=2, micro_batches=4)
    chunks = list(sampler)
    assert len(chunks) == 12
    for i in range(3):
        joined = [index for chunk in chunks[4 * i : 4 * i + 4] for index in chunk]
        assert joined == sampler.logical_batch(i).tolist()


# ------------------------------------------------------------------------------------------------- guard
def _guard(target: float, steps: int = 100, q: float = 0.05, sigma_max: float = 5.0) -> BudgetGuard:
    return BudgetGuard(make_accountant("rdp"), target, 1e-5, q, steps, sigma_max)


def test_the_guard_raises_a_sigma_that_would_break_the_budget() -> None:
    guard = _guard(target=2.0)
    safe = guard.safe_sigma(0.3, interval=10)
    assert safe is not None and safe > 0.3
    # What it lets through keeps the whole plan within the target; one grid step lower would not.
    assert guard._epsilon(safe, 10) <= 2.0
    assert guard._epsilon(safe / 10 ** (1 / 200) * 0.999, 10) > 2.0


def test_the_guard_lets_a_safe_sigma_through_unchanged_up_to_its_grid() -> None:
    guard = _guard(target=50.0)
    safe = guard.safe_sigma(1.0, interval=10)
    assert safe is not None and 1.0 <= safe <= 1.0 * 10 ** (1 / 200) * (1 + 1e-12)


def test_the_guard_refuses_when_even_sigma_max_breaks_the_budget() -> None:
    guard = _guard(target=0.01, sigma_max=1.0)
    assert guard.safe_sigma(0.5, interval=10) is None


def test_following_the_guard_keeps_the_final_epsilon_within_target() -> None:
    guard = _guard(target=1.5, steps=60)
    rng = np.random.default_rng(0)
    for _ in range(6):
        sigma = guard.safe_sigma(float(rng.uniform(0.2, 3.0)), interval=10)
        assert sigma is not None
        guard.accountant.record(StepEvent(sigma, guard.sample_rate), 10)
    assert guard.accountant.epsilon(1e-5) <= 1.5
