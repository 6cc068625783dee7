"""ε of a plan, and its inverse: the least noise that meets a target.

:func:`smallest_passing` is the one calibration search of the project: every knob calibrated to a privacy
budget (a constant σ, an LMO multiplier, a budget guard's σ, a noise schedule's σ₀) is the smallest value on a
monotone grid for which a check passes, and they differ only in their grid, their first guess and how far they
walk. The check is always the accountant's own ε, so an answer meets its target whatever the search did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.privacy.accounting.base import (
    SIGMA_GRID_PER_DECADE,
    AccountantKind,
    PrivacyAccountant,
    _check_delta,
    _check_kind,
    sigma_from_grid_index,
    sigma_grid_index,
)
from dplightning.privacy.accounting.events import Mechanism, Release, StepEvent, _as_count, _as_float
from dplightning.privacy.accounting.pld import PLDAccountant
from dplightning.privacy.accounting.rdp import RDPAccountant
from dplightning.privacy.mechanisms import LMOMechanism

__all__ = ["SIGMA_SEARCH_RANGE", "compute_epsilon", "make_accountant", "noise_for_target", "smallest_passing"]

SIGMA_SEARCH_RANGE = (0.1, 1e4)
"""Interval searched by :func:`noise_for_target`. Below 0.1, ε is in the hundreds for any realistic run."""

T = TypeVar("T")


def smallest_passing(
    passes: Callable[[T], bool],
    grid: Callable[[int], T],
    start: int,
    step: int,
    *,
    lower: int,
    upper: int,
    growth: int = 2,
    tolerance: int = 1,
    clamp: bool = True,
) -> T | None:
    """The smallest ``grid(k)``, ``lower ≤ k ≤ upper``, for which ``passes`` holds; ``None`` if none is found.

    ``grid`` maps an index to a value, monotone in the index, and ``passes`` is meant to be monotone along it
    (a value passes if a smaller one does). The search guesses that ``grid(start)`` passes and
    ``grid(start - step)`` does not, widens that bracket outward by steps multiplied by ``growth`` each time
    (1: constant steps, 2: doubling), then bisects it to ``tolerance`` indices and returns its passing end. Each
    index is checked at most once, and ``grid(start)`` first.

    Args:
        passes: the check, e.g. ``lambda sigma: epsilon(sigma) <= target``.
        grid: index → value.
        start, step: the guessed bracket ``(start - step, start]``.
        lower, upper: the indices searched.
        growth: factor of the widening steps.
        tolerance: width of the final bracket in indices (1: the exact smallest passing index).
        clamp: a widening step that would cross a bound lands on it, so the answer is exact down to
            ``lower`` (returned if it passes) and ``None`` means ``grid(upper)`` fails. ``False``: the search
            stops where its next step would cross a bound instead: past ``upper`` it gives up (``None``), past
            ``lower`` it returns the last value that passed (there is nothing to gain below); the guessed
            bracket itself is checked as given.
    """
    checked: dict[int, bool] = {}

    def ok(k: int) -> bool:
        if k not in checked:
            checked[k] = bool(passes(grid(k)))
        return checked[k]

    step = max(step, 1)
    hi = start
    lo = max(start - step, lower) if clamp else start - step
    while not ok(hi):  # widen upward: lo fails
        nxt = hi + step
        if nxt > upper:
            if not clamp or hi >= upper:
                return None
            nxt = upper
        lo, hi, step = hi, nxt, step * growth
    while ok(lo):  # widen downward: hi passes
        nxt = lo - step
        if nxt < lower:
            if not clamp or lo <= lower:
                return grid(lo)
            nxt = lower
        lo, hi, step = nxt, lo, step * growth
    while hi - lo > tolerance:  # bisect: lo fails, hi passes
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return grid(hi)


@dataclass(frozen=True)
class _Plan:
    """``steps`` Poisson-sampled releases of one noise at ``sample_rate``, accounted with ``accountant``: what
    :func:`compute_epsilon` evaluates at one noise multiplier and :func:`noise_for_target` searches over."""

    sample_rate: float
    steps: int
    accountant: AccountantKind
    mechanism: Mechanism
    lmo: LMOMechanism | None
    release: Release

    def event(self, noise_multiplier: float) -> StepEvent:
        return StepEvent(noise_multiplier, self.sample_rate, self.mechanism, self.lmo, self.release)

    def check(self) -> None:
        """Raise unless q and the mechanism are valid and the accountant supports them."""
        make_accountant(self.accountant)._canonical(self.event(1.0))

    def epsilon(self, noise_multiplier: float, delta: float) -> float:
        """ε at ``delta`` of the plan at ``noise_multiplier``."""
        acc = make_accountant(self.accountant)
        event = self.event(noise_multiplier)
        return acc.epsilon_with(delta, [(event, _as_count(self.steps, "steps"))])


def make_accountant(kind: AccountantKind = "pld") -> PrivacyAccountant:
    """A fresh accountant: ``"pld"`` (tight, default) or ``"rdp"``."""
    if _check_kind(kind) == "pld":
        return PLDAccountant()
    return RDPAccountant()


def compute_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind = "pld",
    mechanism: Mechanism = "gaussian",
    lmo: LMOMechanism | None = None,
    release: Release = "scalar",
) -> float:
    """ε at ``delta`` after ``steps`` Poisson-sampled releases at (``noise_multiplier``, ``sample_rate``)."""
    return _Plan(sample_rate, steps, accountant, mechanism, lmo, release).epsilon(noise_multiplier, delta)


def noise_for_target(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantKind = "pld",
    mechanism: Mechanism = "gaussian",
    lmo: LMOMechanism | None = None,
    release: Release = "scalar",
) -> float:
    """Smallest σ on the accountants' log grid with ``compute_epsilon(σ, sample_rate, steps, delta, ...) ≤ epsilon``.

    :func:`smallest_passing` on the grid index, checking :func:`compute_epsilon` itself, so the returned σ meets
    the target (the grid spacing is 0.23 %). The walk starts from σ = 1 by factors 2, 4, 16, ...; for PLD it
    starts from the cheap RDP answer instead (RDP needs a little more noise, and PLD is slow at tiny σ) by factors
    1.1, 1.2, 1.5, .... For LMO noise (ε not proven monotone in the multiplier) it walks by constant factors of 2,
    so no stretch is jumped by more than one step.
    σ is searched in :data:`SIGMA_SEARCH_RANGE`; if its lower end already meets the target, that is returned.

    Raises:
        PrivacyBudgetError: the target is not positive, or unreachable with σ ≤ 1e4.
    """
    d = _check_delta(delta)
    kind = _check_kind(accountant)
    target = _as_float(epsilon, "epsilon")
    n = _as_count(steps, "steps")
    plan = _Plan(sample_rate, n, kind, mechanism, lmo, release)
    plan.check()
    if not (target > 0 and math.isfinite(target)):
        raise PrivacyBudgetError(
            f"target epsilon must be a positive finite number, got {epsilon!r}; pick ε > 0"
        )
    if n == 0:
        raise DPLightningError("steps must be >= 1 to calibrate noise; pass the planned number of steps")

    def passes(sigma: float) -> bool:
        return plan.epsilon(sigma, d) <= target

    k_min, k_max = (sigma_grid_index(s) for s in SIGMA_SEARCH_RANGE)
    start, step, growth = 0, round(math.log10(2) * SIGMA_GRID_PER_DECADE), 2
    if mechanism == "lmo":
        growth = 1
    elif kind == "pld" and not (mechanism == "laplace" and sample_rate < 1):
        # RDP is cheap and looser, so its σ is a close upper guess for PLD's.
        try:
            start = sigma_grid_index(noise_for_target(target, d, sample_rate, n, "rdp", mechanism))
        except PrivacyBudgetError:
            start = k_max
        step = round(math.log10(1.1) * SIGMA_GRID_PER_DECADE)
    sigma = smallest_passing(
        passes, sigma_from_grid_index, start, step, lower=k_min, upper=k_max, growth=growth
    )
    if sigma is None:
        most = SIGMA_SEARCH_RANGE[1]
        at = f"with LMO noise even at multiplier {most:g}" if mechanism == "lmo" else f"even with σ={most:g}"
        raise PrivacyBudgetError(
            f"ε={target:g} at δ={d:g} is unreachable in {n} steps at q={sample_rate:g} {at}; "
            "raise ε or δ, or take fewer steps"
        )
    return sigma
