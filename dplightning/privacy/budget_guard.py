"""A budget guard for controllers that change σ during training: never let a σ through that could overspend.

:class:`BudgetGuard` answers "what is the smallest σ' ≥ the proposed σ that keeps ε ≤ target even if every
remaining step ran at σ_max?", so whatever a controller proposes later, the planned run stays within budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dplightning.privacy.accounting import Accountant, StepEvent, smallest_passing

__all__ = ["GUARD_GRID_PER_DECADE", "BudgetGuard"]

GUARD_GRID_PER_DECADE = 200  # σ steps of 1.2 %


def _guard_grid(k: int) -> float:
    return 10 ** (k / GUARD_GRID_PER_DECADE)


@dataclass
class BudgetGuard:
    """Never lets a σ through unless ε(history + next interval at σ + rest at σ_max) ≤ target."""

    accountant: Accountant
    target_epsilon: float
    delta: float
    sample_rate: float
    total_steps: int
    sigma_max: float

    def _epsilon(self, sigma: float, interval: int) -> float:
        remaining = max(self.total_steps - self.accountant.steps, 0)
        now = min(interval, remaining)
        extra = [(StepEvent(sigma, self.sample_rate), now)] if now > 0 else []
        if remaining - now > 0:
            extra.append((StepEvent(self.sigma_max, self.sample_rate), remaining - now))
        return self.accountant.epsilon_with(self.delta, extra)

    def passes(self, sigma: float, interval: int) -> bool:
        """Whether ``sigma`` itself (not rounded onto the grid) keeps the budget: lets a controller apply the
        calibrated σ unchanged, so that its neutral action reproduces the uncontrolled run exactly."""
        return self._epsilon(sigma, interval) <= self.target_epsilon

    def safe_sigma(self, sigma: float, interval: int) -> float | None:
        """The smallest σ' ≥ σ on the guard's log grid (``GUARD_GRID_PER_DECADE``) that passes, or ``None`` if
        even σ_max fails. Rounding σ up onto a coarse grid is conservative and keeps the accountant's caches hot
        (a controller proposes a new real number every decision).

        The proposed σ is checked first (a controller's proposal usually passes: one query), then σ_max, then
        bisection between them.
        """
        hi = math.ceil(math.log10(self.sigma_max) * GUARD_GRID_PER_DECADE - 1e-9)
        lo = min(math.ceil(math.log10(sigma) * GUARD_GRID_PER_DECADE - 1e-9), hi)
        return smallest_passing(
            lambda s: self._epsilon(s, interval) <= self.target_epsilon,
            _guard_grid,
            lo,
            hi - lo,
            lower=lo,
            upper=hi,
        )
