"""Privacy accounting over Google's ``dp-accounting`` (PLD default, RDP optional).

One interface, :class:`PrivacyAccountant`; two implementations. History is kept compressed as
``(StepEvent, count)`` pairs so heterogeneous runs (σ changing every step under a controller) stay cheap:

- RDP is additive per order, so each new step adds its RDP vector (incremental, O(orders)).
- PLD composes per distinct event. σ is first quantised DOWN onto a log grid (1000 points per decade):
  rounding σ down can only increase ε, so the reported ε is an upper bound. Composed results are cached.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

import dp_accounting
import numpy as np
from absl import logging as absl_logging
from dp_accounting import pld, rdp

from dplightning.errors import DPLightningError, PrivacyBudgetError

Mechanism = Literal["gaussian", "laplace"]
AccountantKind = Literal["pld", "rdp"]

# dp-accounting logs a warning per order it cannot evaluate; those orders are excluded (sound), keep logs clean.
absl_logging.set_verbosity(absl_logging.ERROR)

SIGMA_GRID_PER_DECADE = 1000
RDP_ORDERS: tuple[float, ...] = tuple(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
PLD_VALUE_DISCRETIZATION = 1e-3  # measured: 1000 steps at q=0.01 within 0.05% of 1e-4 and 8x faster


@dataclass(frozen=True)
class StepEvent:
    """One private release.

    Attributes:
        noise_multiplier: Gaussian std / L2 sensitivity, or Laplace scale / L1 sensitivity. 0 means no noise.
        sample_rate: Poisson sampling probability q in (0, 1].
        mechanism: ``"gaussian"`` or ``"laplace"``.
    """

    noise_multiplier: float
    sample_rate: float
    mechanism: Mechanism = "gaussian"

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or math.isnan(self.noise_multiplier):
            raise DPLightningError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise DPLightningError(f"sample rate q must be in (0, 1], got {self.sample_rate}; lower the batch size")
        if self.mechanism not in ("gaussian", "laplace"):
            raise DPLightningError(f"unknown mechanism '{self.mechanism}'; use gaussian or laplace")

    def to_dp_event(self) -> dp_accounting.DpEvent:
        if self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        inner: dp_accounting.DpEvent
        if self.mechanism == "gaussian":
            inner = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        else:
            inner = dp_accounting.LaplaceDpEvent(self.noise_multiplier)
        if self.sample_rate >= 1.0:
            return inner
        return dp_accounting.PoissonSampledDpEvent(self.sample_rate, inner)


def quantize_sigma_down(sigma: float) -> float:
    """Largest grid value ≤ σ on a log grid with ``SIGMA_GRID_PER_DECADE`` points per decade (conservative)."""
    if sigma <= 0:
        return 0.0
    k = math.floor(math.log10(sigma) * SIGMA_GRID_PER_DECADE + 1e-9)
    return 10 ** (k / SIGMA_GRID_PER_DECADE)


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise DPLightningError(f"delta must be in (0, 1), got {delta}; typical is below 1/N")


class PrivacyAccountant(abc.ABC):
    """Tracks the privacy spent by a sequence of :class:`StepEvent` releases.

    σ is quantised DOWN onto a log grid (``SIGMA_GRID_PER_DECADE`` points per decade) before it is charged:
    a smaller σ can only cost more, so the reported ε is an upper bound, and repeated σ values hit caches.
    """

    kind: AccountantKind

    def __init__(self) -> None:
        self._history: dict[StepEvent, int] = {}

    def step(
        self, noise_multiplier: float, sample_rate: float, num_steps: int = 1, mechanism: Mechanism = "gaussian"
    ) -> None:
        """Record ``num_steps`` releases of the same event."""
        if num_steps < 0:
            raise DPLightningError(f"num_steps must be >= 0, got {num_steps}")
        if num_steps == 0:
            return
        event = self._canonical(StepEvent(float(noise_multiplier), float(sample_rate), mechanism))
        self._history[event] = self._history.get(event, 0) + num_steps
        self._on_step(event, num_steps)

    def _canonical(self, event: StepEvent) -> StepEvent:
        return StepEvent(quantize_sigma_down(event.noise_multiplier), event.sample_rate, event.mechanism)

    def _on_step(self, event: StepEvent, count: int) -> None:  # noqa: B027 - optional hook
        """Incremental update hook."""

    @property
    def steps(self) -> int:
        return sum(self._history.values())

    @property
    def history(self) -> list[tuple[StepEvent, int]]:
        return list(self._history.items())

    def epsilon(self, delta: float) -> float:
        """ε of all steps so far at ``delta``; 0 if none."""
        return self.epsilon_with(delta, ())

    @abc.abstractmethod
    def epsilon_with(self, delta: float, extra: Sequence[tuple[StepEvent, int]]) -> float:
        """ε of the history plus hypothetical ``extra`` (event, count) pairs; the history is not changed."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "history": [[asdict(e), c] for e, c in self._history.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise DPLightningError(f"checkpoint holds a '{state.get('kind')}' accountant, this run uses '{self.kind}'")
        self._history.clear()
        self._reset()
        for event, count in state["history"]:
            self.step(event["noise_multiplier"], event["sample_rate"], count, event["mechanism"])

    def _reset(self) -> None:  # noqa: B027 - optional hook
        """Clear incremental caches."""


@lru_cache(maxsize=4096)
def _pld_of(event: StepEvent, count: int) -> pld.privacy_loss_distribution.PrivacyLossDistribution:
    """PLD of ``count`` self-composed releases of ``event`` (cached: the same pairs recur every query)."""
    acc = pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    acc.compose(event.to_dp_event(), count)
    return acc._pld


class PLDAccountant(PrivacyAccountant):
    """Privacy-loss-distribution accounting (tight), composed per distinct event and cached."""

    kind: AccountantKind = "pld"

    def epsilon_with(self, delta: float, extra: Sequence[tuple[StepEvent, int]]) -> float:
        _check_delta(delta)
        counts = dict(self._history)
        for event, count in extra:
            e = self._canonical(event)
            counts[e] = counts.get(e, 0) + count
        counts = {e: c for e, c in counts.items() if c > 0}
        if not counts:
            return 0.0
        if any(e.noise_multiplier == 0 for e in counts):
            return math.inf
        composed = None
        for event, count in sorted(counts.items(), key=lambda kv: (kv[0].mechanism, kv[0].noise_multiplier, kv[0].sample_rate)):
            part = _pld_of(event, count)
            composed = part if composed is None else composed.compose(part)
        assert composed is not None
        return float(composed.get_epsilon_for_delta(delta))


@lru_cache(maxsize=65536)
def _rdp_vector(event: StepEvent) -> np.ndarray:
    """RDP of one release of ``event`` at ``RDP_ORDERS`` (cached: composition is then a vector add)."""
    if event.mechanism == "laplace" and event.sample_rate < 1.0:
        raise DPLightningError("the RDP accountant has no Poisson-subsampled Laplace; use accountant='pld' for Laplace")
    acc = rdp.RdpAccountant(RDP_ORDERS)
    acc.compose(event.to_dp_event(), 1)
    vec = np.array(acc._rdp, dtype=np.float64)
    vec.flags.writeable = False
    return vec


class RDPAccountant(PrivacyAccountant):
    """Rényi-DP accounting (Mironov et al.); additive per order, so each step adds a cached vector."""

    kind: AccountantKind = "rdp"

    def __init__(self) -> None:
        super().__init__()
        self._rdp = np.zeros(len(RDP_ORDERS))

    def _reset(self) -> None:
        self._rdp = np.zeros(len(RDP_ORDERS))

    def _on_step(self, event: StepEvent, count: int) -> None:
        self._rdp = self._rdp + count * _rdp_vector(event)

    def epsilon_with(self, delta: float, extra: Sequence[tuple[StepEvent, int]]) -> float:
        _check_delta(delta)
        total = self._rdp.copy()
        for event, count in extra:
            if count > 0:
                total += count * _rdp_vector(self._canonical(event))
        if not total.any():
            return 0.0
        eps, _ = rdp.rdp_privacy_accountant.compute_epsilon(np.array(RDP_ORDERS), total, delta)
        return float(eps)


def make_accountant(kind: AccountantKind = "pld") -> PrivacyAccountant:
    """A fresh accountant of ``kind`` (``"pld"`` or ``"rdp"``)."""
    if kind == "pld":
        return PLDAccountant()
    if kind == "rdp":
        return RDPAccountant()
    raise DPLightningError(f"unknown accountant '{kind}'; use pld or rdp")


def compute_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind = "pld",
    mechanism: Mechanism = "gaussian",
) -> float:
    """ε after ``steps`` Poisson-sampled releases at (σ, q)."""
    acc = make_accountant(accountant)
    return acc.epsilon_with(delta, [(StepEvent(noise_multiplier, sample_rate, mechanism), steps)])


def noise_for_target(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantKind = "pld",
    mechanism: Mechanism = "gaussian",
) -> float:
    """Smallest σ (to 0.1 %) with ``compute_epsilon(σ, ...) ≤ epsilon``, by bisection (dp_accounting's)."""
    _check_delta(delta)
    if epsilon <= 0 or not math.isfinite(epsilon):
        raise PrivacyBudgetError(f"target epsilon must be a positive number, got {epsilon}")
    if steps <= 0:
        raise PrivacyBudgetError(f"steps must be positive, got {steps}")
    StepEvent(1.0, sample_rate, mechanism)  # validates q and mechanism

    def eps_of(sigma: float) -> float:
        return compute_epsilon(sigma, sample_rate, steps, delta, accountant, mechanism)

    hi = 1.0
    while eps_of(hi) > epsilon:
        hi *= 2
        if hi > 1e6:
            raise PrivacyBudgetError(
                f"no noise multiplier ≤ 1e6 reaches ε={epsilon} at δ={delta} in {steps} steps; raise ε or δ"
            )
    lo = hi / 2
    while lo > 1e-3 and eps_of(lo) <= epsilon:
        hi, lo = lo, lo / 2
    # invariant: eps(hi) <= target < eps(lo); shrink to 0.1 % relative width, return the safe end
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if eps_of(mid) <= epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def pure_epsilon_laplace(scale: float, sample_rate: float, steps: int) -> float:
    """Pure ε-DP (δ = 0) of ``steps`` Poisson-subsampled Laplace releases (L1 sensitivity 1, scale b):
    amplification ``log(1 + q (e^{1/b} − 1))`` per step, basic composition over steps."""
    if scale <= 0:
        return math.inf
    StepEvent(scale, sample_rate, "laplace")
    return steps * math.log1p(sample_rate * math.expm1(1.0 / scale))
