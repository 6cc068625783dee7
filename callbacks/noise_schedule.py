"""`NoiseSchedule`: decaying noise multiplier σ_t (linear, exponential, step) under the same total (ε, δ) budget.

The schedule's shape ``s_t`` (``s_0 = 1``, non-increasing, ``s_{T-1} = final_ratio``) is fixed; σ_t = σ_0·s_t is
rounded *down* onto a log grid (``levels_per_decade``; less noise is conservative and the grid keeps the number of
distinct events small), and σ_0 is the smallest grid value whose composed heterogeneous-step ε after the planned
T steps is ≤ the target. The composition is the strategy's own accountant (PLD or RDP) on the exact σ_t applied,
so ε after T steps ≤ target, and every prefix of the run costs less.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from dplightning.callbacks._controller import StrategyController
from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.privacy.accounting import (
    AccountantKind,
    StepEvent,
    make_accountant,
    noise_for_target,
    smallest_passing,
)
from dplightning.strategies.protocol import PrivateStrategy

ScheduleKind = Literal["linear", "exponential", "step"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleKind)


def schedule_shape(kind: ScheduleKind, steps: int, final_ratio: float, num_stages: int = 4) -> np.ndarray:
    """Multipliers ``s_t`` ``[steps]``: 1 at the first step, ``final_ratio`` at the last, non-increasing.

    ``linear`` interpolates linearly, ``exponential`` geometrically, ``step`` holds ``num_stages`` equal-length
    stages whose levels are geometric from 1 to ``final_ratio``.
    """
    if kind not in SCHEDULES:
        raise DPLightningError(f"unknown schedule '{kind}'; use one of {', '.join(SCHEDULES)}")
    if steps < 1:
        raise DPLightningError(
            f"a noise schedule needs >= 1 planned step, got {steps}; set trainer.max_steps"
        )
    if not 0.0 < final_ratio <= 1.0:
        raise DPLightningError(
            f"final_ratio must be in (0, 1], got {final_ratio}; e.g. 0.5 halves σ by the end"
        )
    if num_stages < 1:
        raise DPLightningError(f"num_stages must be >= 1, got {num_stages}")
    t = np.arange(steps) / max(steps - 1, 1)  # progress in [0, 1]
    if kind == "linear":
        return 1.0 - (1.0 - final_ratio) * t
    if kind == "exponential":
        return final_ratio**t
    stage = np.minimum((np.arange(steps) * num_stages) // steps, num_stages - 1)
    return final_ratio ** (stage / max(num_stages - 1, 1))


def grid_down(values: np.ndarray, levels_per_decade: int) -> np.ndarray:
    """Round each value down onto the grid ``10 ** (k / levels_per_decade)``."""
    k = np.floor(np.log10(values) * levels_per_decade + 1e-9)
    out = 10.0 ** (k / levels_per_decade)
    return np.where(out > values, 10.0 ** ((k - 1) / levels_per_decade), out)


def schedule_epsilon(
    sigmas: np.ndarray,
    sample_rate: float,
    delta: float,
    accountant: AccountantKind = "pld",
    history: Any = None,
) -> float:
    """ε at ``delta`` of one step at each σ in ``sigmas`` (composed as ``(event, count)`` pairs), on top of
    ``history`` (an accountant whose steps are already spent) if given."""
    values, counts = np.unique(np.asarray(sigmas, dtype=float), return_counts=True)
    events = [(StepEvent(float(v), sample_rate), int(c)) for v, c in zip(values, counts)]
    acc = history if history is not None else make_accountant(accountant)
    return acc.epsilon_with(delta, events)


def calibrate_schedule(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    shape: np.ndarray,
    accountant: AccountantKind = "pld",
    levels_per_decade: int = 50,
    history: Any = None,
) -> np.ndarray:
    """σ_t ``[len(shape)]``: the smallest σ_0 on a grid (2 points per σ_t level) with
    ``schedule_epsilon(grid_down(σ_0·shape)) ≤ target`` under ``accountant`` (on top of ``history`` if given).

    For PLD the search is bracketed with RDP first (cheap: its per-σ curves are cached), then refined with PLD,
    whose composition of ~30 distinct σ costs ~1 s per evaluation.

    Raises:
        PrivacyBudgetError: even σ_0 = 1e4 overspends.
    """
    fine = 2 * levels_per_decade

    def sigmas_at(k: int) -> np.ndarray:
        return grid_down(10.0 ** (k / fine) * shape, levels_per_decade)

    def ok(k: int, kind: AccountantKind) -> bool:
        hist = history if kind == accountant else None
        return schedule_epsilon(sigmas_at(k), sample_rate, delta, kind, hist) <= target_epsilon

    def search(kind: AccountantKind, lo: int, hi: int) -> int:
        """Smallest passing k, widening the guessed bracket (lo, hi] as needed; below σ_0 = 0.01 any passing k
        will do (nothing to gain there)."""
        k = smallest_passing(
            lambda k: ok(k, kind), lambda k: k, hi, hi - lo, lower=-2 * fine, upper=4 * fine, clamp=False
        )
        if k is None:
            raise PrivacyBudgetError(
                f"ε={target_epsilon:g} at δ={delta:g} is unreachable with this noise schedule even at σ_0=1e4; "
                "raise ε, take fewer steps or use a final_ratio closer to 1"
            )
        return k
        while hi - lo > 1:  # invariant: lo fails, hi passes
            mid = (lo + hi) // 2
            if ok(mid, kind):
                hi = mid
            else:
                lo = mid
        return hi

    # Bracket: σ_0 is at least the constant σ that meets the target (every σ_t ≤ σ_0) and at most that σ over the
    # smallest shape value (then every σ_t is at least the constant σ), one grid level of rounding aside.
    steps = len(shape)
    sigma_const = noise_for_target(target_epsilon, delta, sample_rate, steps, accountant="rdp")
    lo = math.floor(math.log10(sigma_const) * fine) - 1
    hi = math.ceil(math.log10(sigma_const / float(shape.min())) * fine) + 2
    if accountant == "pld" and history is None:
        k_rdp = search("rdp", lo, hi)
        # PLD is tighter than RDP: σ_0 is a little lower; a narrow bracket keeps the slow PLD evaluations few.
        k = search("pld", k_rdp - max(fine // 20, 1), k_rdp)
    else:
        k = search(accountant, lo, hi)
    return sigmas_at(k)


class NoiseSchedule(StrategyController[PrivateStrategy]):
    """Decaying σ for ``DPSGDStrategy`` (replaces the strategy's constant σ), calibrated to the total budget.

    Args:
        schedule: ``"linear"``, ``"exponential"`` or ``"step"``.
        final_ratio: σ at the last step / σ at the first.
        num_stages: stages of the ``"step"`` schedule.
        target_epsilon: total budget; ``None`` uses the strategy's (``target_epsilon`` or a ``PrivacyBudget``'s).
        levels_per_decade: resolution of the σ_t grid (50: 4.7 % steps; finer costs more accounting time).
    """

    # It only sets σ of each step's Gaussian release, which DP-ZO's Gaussian noise has too.
    requires_dpsgd = False
    requires_gaussian_noise = True

    def __init__(
        self,
        schedule: ScheduleKind = "exponential",
        final_ratio: float = 0.5,
        num_stages: int = 4,
        target_epsilon: float | None = None,
        levels_per_decade: int = 50,
    ) -> None:
        super().__init__()
        schedule_shape(schedule, 2, final_ratio, num_stages)  # validates the arguments
        if target_epsilon is not None and target_epsilon <= 0:
            raise PrivacyBudgetError(
                f"target_epsilon must be > 0, got {target_epsilon}; pick a positive budget"
            )
        if levels_per_decade < 10:
            raise DPLightningError(f"levels_per_decade must be >= 10, got {levels_per_decade}")
        self.schedule: ScheduleKind = schedule
        self.final_ratio = float(final_ratio)
        self.num_stages = num_stages
        self.target_epsilon = target_epsilon
        self.levels_per_decade = levels_per_decade
        self.sigmas: list[float] | None = None
        self._offset = 0  # accountant steps already spent when the schedule was planned

    @override
    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, strategy: PrivateStrategy) -> None:
        names = {type(cb).__name__ for cb in getattr(trainer, "callbacks", [])}  # set by the Trainer at init
        clash = names & {"QuantileClipping", "RLDPController"}
        if clash:
            raise DPLightningError(
                f"NoiseSchedule and {sorted(clash)[0]} both set σ; use one of them per run"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs before the strategy's own on_train_start: setting σ_0 here stops it calibrating a constant σ.
        strategy = self.strategy
        assert strategy is not None
        if self.sigmas is not None:  # resumed: keep the schedule planned at the start
            strategy.set_noise_multiplier(self.sigma_at(strategy.accountant.steps))
            return
        budgets = [
            e for e in (self.target_epsilon, strategy.target_epsilon, strategy.max_epsilon) if e is not None
        ]
        if not budgets:
            raise DPLightningError("NoiseSchedule needs a budget; set its target_epsilon or the strategy's")
        target = min(budgets)
        steps = trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise DPLightningError(
                "NoiseSchedule needs a planned length; set trainer max_steps or max_epochs"
            )
        remaining = int(steps) - strategy.accountant.steps
        if strategy.sample_rate is None:
            raise DPLightningError(
                "NoiseSchedule found no sample rate: the strategy did not see a torch DataLoader for training"
            )
        shape = schedule_shape(self.schedule, remaining, self.final_ratio, self.num_stages)
        sigmas = calibrate_schedule(
            target,
            strategy.target_delta,
            strategy.sample_rate,
            shape,
            strategy.accountant_kind,
            self.levels_per_decade,
            history=strategy.accountant,
        )
        self.sigmas = [float(s) for s in sigmas]
        self._offset = strategy.accountant.steps
        strategy.set_noise_multiplier(self.sigmas[0])
        rank_zero_info(
            f"[dplightning] {self.schedule} noise schedule for ε={target:g}: σ {self.sigmas[0]:.4f} -> "
            f"{self.sigmas[-1]:.4f} over {remaining} steps"
        )

    @override
    def on_batch_start(self, trainer: pl.Trainer, strategy: PrivateStrategy) -> None:
        # Step t of the schedule is the accountant's step count (micro-batches of one step see the same t).
        sigma = self.sigma_at(strategy.accountant.steps)
        if sigma != strategy.noise_multiplier:
            strategy.set_noise_multiplier(sigma)
            if trainer.logger is not None:
                trainer.logger.log_metrics({"noise_schedule/sigma": sigma}, step=trainer.global_step)

    def sigma_at(self, accountant_steps: int) -> float:
        """σ of the step after ``accountant_steps`` releases (the last value past the planned end)."""
        assert self.sigmas is not None, "the schedule is planned in on_train_start"
        t = min(max(accountant_steps - self._offset, 0), len(self.sigmas) - 1)
        return self.sigmas[t]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"sigmas": self.sigmas, "offset": self._offset}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sigmas = state_dict.get("sigmas")
        self._offset = int(state_dict.get("offset") or 0)
