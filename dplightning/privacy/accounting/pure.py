"""Pure ε-DP (δ = 0) of Laplace releases, and the bound every accountant falls back on past float64's range.

A release whose privacy loss is at most L nats everywhere is L-DP; Poisson subsampling at rate q makes one
release ``log(1 + q (e^L − 1))``-DP, and steps compose by summing (basic composition). ``dp_accounting`` has no
pure-DP accountant; its PLD at δ = 0 agrees.

:func:`laplace_scale_for_pure_epsilon` is the one inverse of :func:`pure_epsilon_laplace` (closed form, then
nudged past float rounding), used wherever a Laplace scale is calibrated to a pure-DP budget.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.privacy.accounting.base import _StepRecorder
from dplightning.privacy.accounting.events import Mechanism, StepEvent, _as_count, _as_float

__all__ = ["laplace_scale_for_pure_epsilon", "pure_epsilon_laplace"]

# Laplace / LMO releases with a larger worst-case loss overflow e^loss in dp_accounting / lmo_accounting
_MAX_RELEASE_LOSS = 700.0


def _release_loss_bound(event: StepEvent) -> float:
    """Worst-case loss of one unsampled Laplace (1/scale) or LMO (K/multiplier) release; 0 for Gaussian."""
    if event.mechanism == "gaussian":
        return 0.0
    lipschitz = 1.0 if event.lmo is None else event.lmo.log_lipschitz
    return lipschitz / event.noise_multiplier  # inf, not an error, if it overflows


def _pure_step_epsilon(x: float, q: float) -> float:
    """``log(1 + q (e^x − 1))``: one Poisson-subsampled (rate q) release of an x-DP mechanism, no overflow."""
    if q == 1.0:
        return x
    if x > 30:  # log(q e^x + 1 − q) without overflow
        return x + math.log(q + (1 - q) * math.exp(-x))
    return math.log1p(q * math.expm1(x))


def pure_epsilon_laplace(scale: float, sample_rate: float, steps: int) -> float:
    """Pure ε-DP (δ = 0) of ``steps`` Poisson-subsampled Laplace releases (L1 sensitivity 1, scale ``scale``).

    Per step ``log(1 + q (e^{1/scale} − 1))`` (amplification by subsampling of a (1/scale)-DP release), summed
    over steps (basic composition).
    """
    event = StepEvent(scale, sample_rate, "laplace")
    n = _as_count(steps, "steps")
    if n == 0:
        return 0.0
    if event.noise_multiplier == 0:
        return math.inf
    return n * _pure_step_epsilon(1.0 / event.noise_multiplier, event.sample_rate)


def laplace_scale_for_pure_epsilon(epsilon: float, sample_rate: float, steps: int) -> float:
    """Smallest Laplace scale with ``pure_epsilon_laplace(scale, sample_rate, steps) ≤ epsilon``.

    Inverse formula ``1/scale = log(1 + (e^{ε/steps} − 1)/q)`` (rewritten past ε/steps = 30 so that e^{ε/steps}
    cannot overflow), then nudged up ulp by ulp until float rounding is on the safe side.

    Raises:
        PrivacyBudgetError: ``epsilon`` is not positive, or ``steps`` < 1.
        DPLightningError: ``steps`` is not an integer, or ``sample_rate`` not in (0, 1].
    """
    target = _as_float(epsilon, "epsilon")
    try:
        n = operator.index(steps)
    except TypeError:
        raise DPLightningError(f"steps must be a positive integer, got {steps!r}; pass an int") from None
    StepEvent(1.0, sample_rate, "laplace")  # validates q
    if not (target > 0 and math.isfinite(target)):
        raise PrivacyBudgetError(
            f"target epsilon must be a positive finite number, got {epsilon!r}; pick ε > 0"
        )
    if n < 1:  # the same type as every other "no noise meets this budget" answer
        raise PrivacyBudgetError(
            f"steps must be >= 1 to calibrate noise, got {n}; pass the planned number of steps"
        )
    per_step, q = target / n, float(sample_rate)
    if per_step > 30:  # 1/scale = log(1 + (e^ε₀ − 1)/q) without overflow
        inv = per_step + math.log(-math.expm1(-per_step) / q + math.exp(-per_step))
    else:
        inv = math.log1p(math.expm1(per_step) / q)
    scale = 1.0 / inv
    while pure_epsilon_laplace(scale, q, n) > target:  # float rounding: step up to the safe side
        scale = math.nextafter(scale, math.inf)
    return scale


class PureLaplaceAccountant(_StepRecorder):
    """Pure ε-DP (δ = 0) of Poisson-subsampled Laplace releases: ``log(1 + q (e^{1/λ} − 1))`` per step (an
    ε₀-DP mechanism on a Poisson subsample is ``log(1 + q (e^{ε₀} − 1))``-DP), composed additively
    (:func:`~dplightning.privacy.accounting.pure_epsilon_laplace`).

    Same interface as :class:`~dplightning.privacy.accounting.PrivacyAccountant` (``step``, ``steps``,
    ``history``, ``epsilon``, ``epsilon_with``, ``state_dict``, ``load_state_dict``). ``epsilon(delta)`` accepts
    any ``delta ≥ 0`` and ignores it: a pure ε guarantee holds for every δ.
    """

    kind = "pure_laplace"
    default_mechanism: ClassVar[Mechanism] = "laplace"

    def __init__(self) -> None:
        self._history: dict[StepEvent, int] = {}

    def record(self, event: StepEvent, num_steps: int = 1) -> None:
        """Record ``num_steps`` releases of ``event`` (Laplace only)."""
        if num_steps < 0:
            raise DPLightningError(f"num_steps must be >= 0, got {num_steps}")
        event = self._check(event)
        if num_steps:
            self._history[event] = self._history.get(event, 0) + int(num_steps)

    @staticmethod
    def _check(event: StepEvent) -> StepEvent:
        if event.mechanism != "laplace":
            raise DPLightningError(
                "the pure-ε accountant only composes Laplace releases; use accountant='pld'"
            )
        return event

    @property
    def steps(self) -> int:
        return sum(self._history.values())

    @property
    def history(self) -> list[tuple[StepEvent, int]]:
        return list(self._history.items())

    def epsilon(self, delta: float = 0.0) -> float:
        """Pure ε of all steps so far (``delta`` is ignored)."""
        return self.epsilon_with(delta, [])

    def epsilon_with(self, delta: float, extra: Sequence[tuple[StepEvent, int]]) -> float:
        """Pure ε of the history plus hypothetical ``(event, count)`` pairs (``delta`` is ignored)."""
        pairs = [*self._history.items(), *((self._check(e), c) for e, c in extra)]
        return sum(pure_epsilon_laplace(e.noise_multiplier, e.sample_rate, c) for e, c in pairs if c > 0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "history": [
                {"noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate, "count": c}
                for e, c in self._history.items()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise DPLightningError(
                f"checkpoint holds a {state.get('kind')!r} accountant, this run uses pure ε-DP Laplace accounting; "
                "resume with the same noise and target_delta"
            )
        self._history = {}
        for entry in state["history"]:
            self.step(entry["noise_multiplier"], entry["sample_rate"], entry["count"])
