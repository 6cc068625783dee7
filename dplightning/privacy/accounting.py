"""Privacy accounting over Google's ``dp_accounting``: PLD (default, tight) and RDP (optional).

One interface, :class:`PrivacyAccountant`, two implementations, in the style of ``dp_accounting``: an
accountant records small immutable :class:`StepEvent` releases and answers ``epsilon(delta)``. All the
mathematics (privacy loss distributions, RDP curves, RDP → (ε, δ) conversion, calibration by root finding)
is ``dp_accounting``'s; this module only decides *which* events are composed, and caches.

**σ grid.** Both accountants first quantise σ **down** onto a log grid with :data:`SIGMA_GRID_PER_DECADE`
points per decade (relative spacing 0.23 %). Less noise can only increase ε, so the reported ε is an upper
bound on the ε of the σ actually used (conservative; +0.15 % for σ = 1.1 in the Abadi et al. MNIST setting).
The grid keeps the history small when a controller changes σ every step, and makes the per-σ caches hit.

History is kept compressed as ``(StepEvent, count)`` pairs:

- **RDP** is additive per order. Each grid value's RDP curve is computed once by ``dp_accounting``'s
  ``RdpAccountant`` (~60 ms for its 156 default orders, hence the cache) and the history's curve is
  ``Σ count · curve``, so a step with a known σ costs one vector sum and no new RDP evaluation.
- **PLD**: each grid value is composed once as ``count × event`` (``self_compose``, the PLD counterpart of
  ``SelfComposedDpEvent``), and the per-value PLDs are composed along a canonical tree (a treap whose shape
  depends only on the set of events), caching every subtree. A step recomposes only the subtrees that contain
  the changed event (expected O(log k) for k distinct σ), and the result is a function of the compressed
  history alone: an accountant restored from :meth:`PrivacyAccountant.state_dict` reports bit-identical ε.
- :meth:`PrivacyAccountant.epsilon_with` (a budget guard's "would one more step fit?") composes only the
  hypothetical extra events onto the cached PLD (or RDP curve) of the history.

PLD discretisation: ``value_discretization_interval`` = :data:`DEFAULT_VALUE_DISCRETIZATION` (5e-4, with
``dp_accounting``'s pessimistic connect-the-dots discretisation, so its error is again an over-estimate).
Measured against a 1e-5 reference, the relative ε error is < 0.1 % for 10^4 steps (MNIST setting: +0.09 %)
and 0.6 % for 10^5 steps at q = 0.001 (it grows roughly like steps × interval²). A budget-guard query
(history PLD ⊗ one more step, then ε) takes 10-40 ms for typical settings (ε ≲ 15), up to ~90 ms for σ ≈ 0.6
or ε ≈ 40; an ``epsilon()`` after a step (recomposing the changed subtrees) ~90 ms for 10^4 steps at one σ,
~120 ms with 50 distinct σ. ``dp_accounting``'s default interval of 1e-4 is ~5x slower; 1e-3 is ~2x faster
but 2 % off at 10^5 steps.

**Tiny noise.** A PLD array spans the whole privacy-loss range at that resolution, about 1/σ² nats for the
Gaussian: σ = 1e-6 asked ``dp_accounting`` for petabytes, σ = 0.01 ran for minutes. So before building
anything the PLD accountant sizes each ``count × event`` it composes: one release's loss range from
``dp_accounting``'s connect-the-dots bounds, and for a self-composition the window ``dp_accounting`` will
allocate (its Chernoff bound, which is set in nats and so is measured on a cheap 2048-point probe PLD). Where
an array would exceed :data:`PLD_MAX_POINTS` the whole query (PLDs compose only on one grid) moves to the grid
``interval · 2^k`` that fits, and a composition that still outgrows the limit restarts one grid coarser. The
pessimistic discretisation is an upper bound on any grid, and where this happens ε is in the hundreds or more,
so the coarse grid costs little (σ = 0.05, q = 0.01, 300 steps: ε = 2525.66 on a grid of 0.032 in 0.18 s,
2525.64 on 5e-4 in 13 s; see ``benchmarks/results/accountant_small_sigma.md``). Settings with ε ≲ 40 never
reach the limit and give the same ε, bit for bit, as before. Past the coarsest usable grid (e^interval must
stay far from overflow), and for Laplace / LMO releases whose worst-case loss exceeds 700 nats
(``dp_accounting`` and :mod:`~dplightning.privacy.lmo_accounting` hold e^loss in float64), ε comes from RDP
instead: ``dp_accounting``'s for the Gaussian and the full-batch Laplace mechanism, otherwise the pure-DP
bound ε₀ = log(1 + q(e^L − 1)) of the release (L = 1/scale, or K/multiplier for LMO) as the RDP curve
min(ε₀, αε₀²/2). RDP is the last resort because it is much looser there (σ = 0.01, q = 0.01, 300 steps: 1.63e6
against the coarse PLD's 6.48e4) while both answer within a fraction of a second. The RDP accountant needs no
such guard; its LMO curve uses the same pure-DP bound past 700 nats (the numerical one overflowed there, even
to 0).
"""

from __future__ import annotations

import abc
import hashlib
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Literal, get_args

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.pld import privacy_loss_mechanism as pld_mechanism
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from scipy import special

from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.privacy import lmo_accounting
from dplightning.privacy.mechanisms import LMOMechanism

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_VALUE_DISCRETIZATION",
    "MECHANISMS",
    "PLD_MAX_POINTS",
    "SIGMA_GRID_PER_DECADE",
    "SIGMA_SEARCH_RANGE",
    "AccountantKind",
    "Mechanism",
    "PLDAccountant",
    "PrivacyAccountant",
    "RDPAccountant",
    "Release",
    "StepEvent",
    "compute_epsilon",
    "laplace_scale_for_pure_epsilon",
    "make_accountant",
    "noise_for_target",
    "pure_epsilon_laplace",
    "quantize_sigma_down",
    "sigma_from_grid_index",
    "sigma_grid_index",
]

Mechanism = Literal["gaussian", "laplace", "lmo"]
Release = Literal["scalar", "vector"]
AccountantKind = Literal["pld", "rdp"]
MECHANISMS: tuple[str, ...] = get_args(Mechanism)
RELEASES: tuple[str, ...] = get_args(Release)
ACCOUNTANTS: tuple[str, ...] = get_args(AccountantKind)

SIGMA_GRID_PER_DECADE = 1000
"""Points per decade of the log grid onto which the accountants quantise σ (rounding down: conservative)."""

DEFAULT_VALUE_DISCRETIZATION = 5e-4
"""``value_discretization_interval`` of the PLD accountant (see the module docstring for the measurements)."""

SIGMA_SEARCH_RANGE = (0.1, 1e4)
"""Interval searched by :func:`noise_for_target`. Below 0.1, ε is in the hundreds for any realistic run."""

PLD_MAX_POINTS = 2**18
"""Most points of one PLD probability array before :class:`PLDAccountant` coarsens its loss grid (tiny noise,
see the module docstring). Read when a query is first answered, so change it only in a fresh process."""

# coarsest PLD loss grid: dp_accounting needs e^interval far from float64 overflow (e^709)
_PLD_MAX_INTERVAL = 300.0
# Laplace / LMO releases with a larger worst-case loss overflow e^loss in dp_accounting / lmo_accounting
_MAX_RELEASE_LOSS = 700.0
_PROBE_POINTS = 2048  # resolution of the probe PLD that sizes dp_accounting's self-composition window
_TAIL_MASS = 1e-15  # dp_accounting's default tail_mass_truncation of compose / self_compose

_STATE_VERSION = 1
_EventCounts = list[tuple["StepEvent", int]]


@dataclass(frozen=True)
class StepEvent:
    """One private release: noise of multiplier ``noise_multiplier`` on a Poisson sample of rate ``sample_rate``.

    Attributes:
        noise_multiplier: Gaussian std / L2 sensitivity, or Laplace scale / L1 sensitivity; for ``"lmo"`` the
            factor s of the noise ``s · C · n`` (n ~ ``lmo``) added to a release of sensitivity C. ``0`` means no
            noise (ε = ∞).
        sample_rate: Poisson sampling probability q in (0, 1]; 1 means the whole dataset.
        mechanism: ``"gaussian"``, ``"laplace"`` or ``"lmo"`` (:mod:`dplightning.privacy.lmo_accounting`).
        lmo: the LMO noise distribution (``mechanism="lmo"`` only; a parameter dict is accepted).
        release: ``"lmo"`` only: ``"scalar"`` (one coordinate; PLD or RDP) or ``"vector"`` (i.i.d. noise on a
            vector with L1 sensitivity C; RDP only, after the convexity check of DESIGN §6).
    """

    noise_multiplier: float
    sample_rate: float
    mechanism: Mechanism = "gaussian"
    lmo: LMOMechanism | None = None
    release: Release = "scalar"

    def __post_init__(self) -> None:
        sigma = _as_float(self.noise_multiplier, "noise_multiplier")
        q = _as_float(self.sample_rate, "sample_rate")
        if not (math.isfinite(sigma) and sigma >= 0):
            raise DPLightningError(
                f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}; "
                "pass the noise std (Laplace: scale) divided by the sensitivity"
            )
        if not 0.0 < q <= 1.0:
            raise DPLightningError(
                f"sample_rate must be in (0, 1], got {self.sample_rate!r}; use expected batch size / dataset size"
            )
        if self.mechanism not in MECHANISMS:
            raise DPLightningError(
                f"unknown mechanism {self.mechanism!r}; use 'gaussian', 'laplace' or 'lmo'"
            )
        if self.release not in RELEASES:
            raise DPLightningError(f"unknown release {self.release!r}; use 'scalar' or 'vector'")
        if self.mechanism == "lmo":
            if self.lmo is None:
                raise DPLightningError("mechanism='lmo' needs lmo=LMOMechanism(...) (or its parameter dict)")
            object.__setattr__(self, "lmo", LMOMechanism.coerce(self.lmo))
        elif self.lmo is not None or self.release != "scalar":
            raise DPLightningError(
                f"lmo= and release= apply to mechanism='lmo' only, got mechanism={self.mechanism!r}; drop them"
            )
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "sample_rate", q)

    def to_dp_event(self) -> dp_accounting.DpEvent:
        """The equivalent ``dp_accounting`` event (``PoissonSampledDpEvent`` unless q = 1). Not for LMO noise."""
        if self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        if self.mechanism == "lmo":
            raise DPLightningError(
                "dp_accounting has no event for LMO noise; account it with PLDAccountant/RDPAccountant"
            )
        inner: dp_accounting.DpEvent
        if self.mechanism == "gaussian":
            inner = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        else:
            inner = dp_accounting.LaplaceDpEvent(self.noise_multiplier)
        if self.sample_rate == 1.0:
            return inner
        return dp_accounting.PoissonSampledDpEvent(self.sample_rate, inner)


def _as_float(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DPLightningError(f"{name} must be a number, got {value!r}; pass a float") from None


def _as_count(value: Any, name: str = "num_steps") -> int:
    try:
        count = operator.index(value)
    except TypeError:
        raise DPLightningError(f"{name} must be a non-negative integer, got {value!r}; pass an int") from None
    if count < 0:
        raise DPLightningError(f"{name} must be a non-negative integer, got {count}; pass an int >= 0")
    return count


def _check_delta(delta: Any) -> float:
    d = _as_float(delta, "delta")
    if not 0.0 < d < 1.0:
        raise DPLightningError(
            f"delta must be in (0, 1), got {delta!r}; pick δ well below 1/dataset size, e.g. 1e-5"
        )
    return d


def _check_kind(kind: Any) -> AccountantKind:
    if kind not in ACCOUNTANTS:
        raise DPLightningError(f"unknown accountant {kind!r}; use 'pld' or 'rdp'")
    return kind  # type: ignore[no-any-return]


def _sort_key(event: StepEvent) -> tuple[Any, ...]:
    base = (event.mechanism, event.sample_rate, event.noise_multiplier)
    if event.lmo is None:
        return base
    return (*base, event.release, *event.lmo.key())


# --------------------------------------------------------------------------------------------------- σ grid


def sigma_grid_index(sigma: float) -> int:
    """Index k of the largest grid value ``10 ** (k / SIGMA_GRID_PER_DECADE)`` that is ≤ ``sigma`` (> 0)."""
    k = math.floor(math.log10(sigma) * SIGMA_GRID_PER_DECADE + 1e-9)
    if sigma_from_grid_index(k) > sigma:  # the 1e-9 guard must never round *up*
        k -= 1
    return k


def sigma_from_grid_index(k: int) -> float:
    """Grid value ``10 ** (k / SIGMA_GRID_PER_DECADE)``."""
    return 10.0 ** (k / SIGMA_GRID_PER_DECADE)


def quantize_sigma_down(sigma: float) -> float:
    """Largest grid value ≤ ``sigma`` (0 stays 0). Less noise never lowers ε, so this is conservative."""
    if sigma <= 0:
        return 0.0
    return sigma_from_grid_index(sigma_grid_index(sigma))


# ----------------------------------------------------------------------------------------------- interface


class PrivacyAccountant(abc.ABC):
    """Tracks the privacy spent by a sequence of :class:`StepEvent` releases (add-or-remove-one adjacency).

    Implementations: :class:`PLDAccountant` (tight) and :class:`RDPAccountant`. Create one with
    :func:`make_accountant`.
    """

    kind: ClassVar[AccountantKind]

    def __init__(self) -> None:
        self._history: dict[StepEvent, int] = {}
        self._steps = 0
        self._epsilon_cache: dict[float, float] = {}

    # ----------------------------------------------------------------------------------------- recording

    def step(
        self,
        noise_multiplier: float,
        sample_rate: float,
        num_steps: int = 1,
        mechanism: Mechanism = "gaussian",
        lmo: LMOMechanism | None = None,
        release: Release = "scalar",
    ) -> None:
        """Record ``num_steps`` releases of the same event."""
        self.record(StepEvent(noise_multiplier, sample_rate, mechanism, lmo, release), num_steps)

    def record(self, event: StepEvent, num_steps: int = 1) -> None:
        """Record ``num_steps`` releases of ``event``."""
        count = _as_count(num_steps)
        if not isinstance(event, StepEvent):
            raise DPLightningError(
                f"record() needs a StepEvent, got {type(event).__name__}; wrap it in StepEvent"
            )
        event = self._canonical(event)
        if count == 0:
            return
        self._history[event] = self._history.get(event, 0) + count
        self._steps += count
        self._epsilon_cache.clear()
        self._history_changed()

    @property
    def steps(self) -> int:
        """Number of releases recorded so far."""
        return self._steps

    @property
    def history(self) -> list[tuple[StepEvent, int]]:
        """Compressed history: distinct (canonical) events with their counts, in order of first use."""
        return list(self._history.items())

    # ------------------------------------------------------------------------------------------ querying

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` of all steps so far; ``0.0`` if none. Cached until the next :meth:`step`."""
        d = _check_delta(delta)
        cached = self._epsilon_cache.get(d)
        if cached is None:
            cached = self._query(d, [])
            self._epsilon_cache[d] = cached
        return cached

    def epsilon_with(self, delta: float, extra: Sequence[tuple[StepEvent, int]]) -> float:
        """ε at ``delta`` of the history plus hypothetical ``extra`` ``(event, count)`` pairs.

        The history is not changed. This is what a budget guard asks before each step, so it reuses the cached
        history and only composes the extra events.
        """
        d = _check_delta(delta)
        pairs = self._canonical_extra(extra)
        if not pairs:
            return self.epsilon(d)
        return self._query(d, pairs)

    def _query(self, delta: float, extra: _EventCounts) -> float:
        if not self._history and not extra:
            return 0.0
        events = [*self._history, *(e for e, _ in extra)]
        if any(e.noise_multiplier == 0 for e in events):  # a release without noise
            return math.inf
        return float(self._epsilon(delta, extra))

    def _canonical_extra(self, extra: Iterable[tuple[StepEvent, int]]) -> _EventCounts:
        merged: dict[StepEvent, int] = {}
        for pair in extra:
            try:
                event, count = pair
            except (TypeError, ValueError):
                raise DPLightningError(
                    f"extra must hold (StepEvent, count) pairs, got {pair!r}; pass e.g. [(StepEvent(1.0, 0.01), 1)]"
                ) from None
            if not isinstance(event, StepEvent):
                raise DPLightningError(
                    f"extra events must be StepEvent, got {type(event).__name__}; wrap it in StepEvent"
                )
            n = _as_count(count, "extra count")
            canonical = self._canonical(event)
            if n:
                merged[canonical] = merged.get(canonical, 0) + n
        return sorted(merged.items(), key=lambda kv: _sort_key(kv[0]))

    # ---------------------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state of plain Python types (JSON-able); :meth:`load_state_dict` restores it exactly."""
        return {
            "kind": self.kind,
            "version": _STATE_VERSION,
            "history": [
                {
                    "noise_multiplier": e.noise_multiplier,
                    "sample_rate": e.sample_rate,
                    "mechanism": e.mechanism,
                    **({} if e.lmo is None else {"lmo": e.lmo.to_dict(), "release": e.release}),
                    "count": c,
                }
                for e, c in self._history.items()
            ],
            **self._settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this accountant's history with the one in ``state`` (from :meth:`state_dict`)."""
        if not isinstance(state, dict):
            raise DPLightningError(
                f"accountant state must be a dict, got {type(state).__name__}; pass state_dict()"
            )
        if state.get("kind") != self.kind:
            raise DPLightningError(
                f"checkpoint holds a {state.get('kind')!r} accountant but this run uses {self.kind!r}; "
                f"set accountant={state.get('kind')!r} to resume it"
            )
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise DPLightningError(
                f"accountant state version {state.get('version')!r} is not supported (expected {_STATE_VERSION}); "
                "resume with the dplightning version that wrote the checkpoint"
            )
        history: dict[StepEvent, int] = {}
        try:
            entries = list(state["history"])
            for entry in entries:
                if isinstance(entry, dict):
                    fields, count = entry, entry["count"]
                else:  # legacy [{event fields}, count] pairs
                    fields, count = entry
                event = StepEvent(
                    fields["noise_multiplier"],
                    fields["sample_rate"],
                    fields.get("mechanism", "gaussian"),
                    fields.get("lmo"),
                    fields.get("release", "scalar"),
                )
                n = _as_count(count, "history count")
                if n:
                    history[event] = history.get(event, 0) + n
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DPLightningError):
                raise
            raise DPLightningError(
                f"malformed accountant state ({type(exc).__name__}: {exc}); pass the dict returned by state_dict()"
            ) from None
        canonical: dict[StepEvent, int] = {}
        for event, count in history.items():
            e = self._canonical(event)
            canonical[e] = canonical.get(e, 0) + count
        self._load_settings(state)  # the last check; nothing has been changed before it
        self._history = canonical
        self._steps = sum(canonical.values())
        self._epsilon_cache.clear()
        self._history_changed()

    # --------------------------------------------------------------------------------- implementation hooks

    def _canonical(self, event: StepEvent) -> StepEvent:
        """The event as recorded: σ quantised down onto the grid. Raises if this accountant cannot account it.

        LMO events are kept exact: ε is not proven monotone in their multiplier, so rounding it is not safe.
        """
        if event.mechanism == "lmo":
            return event
        sigma = quantize_sigma_down(event.noise_multiplier)
        if sigma == event.noise_multiplier:
            return event
        return StepEvent(sigma, event.sample_rate, event.mechanism)

    def _history_changed(self) -> None:  # noqa: B027 - optional hook
        """Invalidate caches that depend on the history."""

    def _settings(self) -> dict[str, Any]:
        return {"sigma_grid_per_decade": SIGMA_GRID_PER_DECADE}

    def _load_settings(self, state: dict[str, Any]) -> None:
        """Check / restore the settings written by :meth:`_settings`."""
        grid = state.get("sigma_grid_per_decade", SIGMA_GRID_PER_DECADE)
        if grid != SIGMA_GRID_PER_DECADE:
            raise DPLightningError(
                f"checkpoint quantised σ with {grid} points per decade, this version uses {SIGMA_GRID_PER_DECADE}; "
                "resume with the dplightning version that wrote it"
            )

    @abc.abstractmethod
    def _epsilon(self, delta: float, extra: _EventCounts) -> float:
        """ε of history + ``extra`` (canonical, merged, sorted, non-empty union, all σ > 0)."""


# --------------------------------------------------------------------------------------------------- PLD


def _single_release_pld(event: StepEvent, interval: float) -> pld_lib.PrivacyLossDistribution:
    """PLD of a single release of ``event`` (what ``dp_accounting.pld.PLDAccountant`` builds for it)."""
    if event.mechanism == "gaussian":
        return pld_lib.from_gaussian_mechanism(
            standard_deviation=event.noise_multiplier,
            sampling_prob=event.sample_rate,
            value_discretization_interval=interval,
        )
    if event.mechanism == "lmo":
        assert event.lmo is not None
        return lmo_accounting.lmo_pld(event.lmo, 1.0 / event.noise_multiplier, event.sample_rate, interval)
    return pld_lib.from_laplace_mechanism(
        parameter=event.noise_multiplier,
        sampling_prob=event.sample_rate,
        value_discretization_interval=interval,
    )


@lru_cache(maxsize=128)
def _base_pld(event: StepEvent, interval: float) -> pld_lib.PrivacyLossDistribution:
    """:func:`_single_release_pld`, cached."""
    return _single_release_pld(event, interval)


@lru_cache(maxsize=8)
def _self_composed_pld(event: StepEvent, count: int, interval: float) -> pld_lib.PrivacyLossDistribution:
    """PLD of ``count`` releases of ``event``, i.e. of ``SelfComposedDpEvent(event.to_dp_event(), count)``."""
    if event.mechanism == "gaussian" and event.sample_rate == 1.0:
        # As dp_accounting: count Gaussian releases are one Gaussian of std σ/√count (exact, one discretisation).
        return pld_lib.from_gaussian_mechanism(
            standard_deviation=event.noise_multiplier / math.sqrt(count),
            value_discretization_interval=interval,
        )
    base = _base_pld(event, interval)
    return base if count == 1 else base.self_compose(count)


def _priority(event: StepEvent) -> int:
    """Deterministic pseudo-random treap priority (``hash()`` is salted per process, so not usable)."""
    digest = hashlib.blake2b(repr(_sort_key(event)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


# ----------------------------------------------------------------------------------- PLD size (tiny noise)


class _Oversized(Exception):
    """A composed PLD came out larger than :data:`PLD_MAX_POINTS`: the query restarts on a coarser grid."""

    def __init__(self, points: int) -> None:
        super().__init__(points)
        self.points = points


def _pmfs(pld: pld_lib.PrivacyLossDistribution) -> tuple[Any, ...]:
    # dp_accounting has no public accessor for a PLD's size or probabilities; its two PMFs (remove / add
    # adjacency, the same object when symmetric) are the attributes below in every release since 0.4.
    return (pld._pmf_remove,) if pld._symmetric else (pld._pmf_remove, pld._pmf_add)


def _checked(pld: pld_lib.PrivacyLossDistribution) -> pld_lib.PrivacyLossDistribution:
    """``pld``, unless one of its arrays exceeds :data:`PLD_MAX_POINTS` (then :class:`_Oversized`)."""
    points = max(pmf.size for pmf in _pmfs(pld))
    if points > PLD_MAX_POINTS:
        raise _Oversized(points)
    return pld


def _release_loss_bound(event: StepEvent) -> float:
    """Worst-case loss of one unsampled Laplace (1/scale) or LMO (K/multiplier) release; 0 for Gaussian."""
    if event.mechanism == "gaussian":
        return 0.0
    lipschitz = 1.0 if event.lmo is None else event.lmo.log_lipschitz
    return lipschitz / event.noise_multiplier  # inf, not an error, if it overflows


@lru_cache(maxsize=1024)
def _loss_range(event: StepEvent) -> float:
    """Width (nats) of the loss support the PLD of one release of ``event`` spans; ``inf`` if it overflows."""
    if event.mechanism == "lmo":
        return 2.0 * _release_loss_bound(event)  # |log r| ≤ K·Δ; subsampling only shrinks the loss
    loss_class = (
        pld_mechanism.GaussianPrivacyLoss
        if event.mechanism == "gaussian"
        else pld_mechanism.LaplacePrivacyLoss
    )
    adjacencies = [pld_mechanism.AdjacencyType.REMOVE]
    if event.sample_rate < 1.0:
        adjacencies.append(pld_mechanism.AdjacencyType.ADD)
    width = 0.0
    try:
        with np.errstate(all="ignore"):
            for adjacency in adjacencies:
                loss = loss_class(
                    event.noise_multiplier, sampling_prob=event.sample_rate, adjacency_type=adjacency
                )
                bounds = loss.connect_dots_bounds()
                width = max(width, float(bounds.epsilon_upper - bounds.epsilon_lower))
    except (ArithmeticError, ValueError):  # σ so small that 1/σ² overflows
        return math.inf
    return width if math.isfinite(width) else math.inf


@lru_cache(maxsize=64)
def _probe_pld(event: StepEvent) -> tuple[float, pld_lib.PrivacyLossDistribution]:
    """``(interval, PLD)`` of one release on a grid of about :data:`_PROBE_POINTS` points (cheap at any σ)."""
    interval = min(_loss_range(event) / _PROBE_POINTS, _PLD_MAX_INTERVAL)
    return interval, _single_release_pld(event, interval)


@lru_cache(maxsize=1024)
def _self_composed_width(event: StepEvent, count: int) -> float:
    """Span (nats) of the window that ``self_compose(count)`` allocates: ``dp_accounting``'s Chernoff bound.

    Its orders are set relative to the loss range, so the window in nats barely depends on the grid: it is
    measured on the probe PLD, where it is cheap, instead of on the (possibly huge) real one.
    """
    interval, probe = _probe_pld(event)
    return interval * max(_self_convolve_points(pmf.to_dense_pmf()._probs, count) for pmf in _pmfs(probe))


def _self_convolve_points(probs: np.ndarray, count: int) -> int:
    """Length of the window ``dp_accounting.pld.common.self_convolve`` allocates for ``count`` × ``probs``.

    The same Chernoff bound as its ``compute_self_convolve_bounds`` (same orders, same rounding), evaluated
    for all orders in one vectorised call instead of forty: this runs on every step of a training run.
    """
    size = len(probs)
    orders = np.concatenate((np.arange(-20, 0), np.arange(1, 21))) / size
    log_mgfs = special.logsumexp(np.outer(orders, np.arange(size)), b=probs, axis=1)
    with np.errstate(all="ignore"):
        bounds = (count * log_mgfs + math.log(2 / _TAIL_MASS)) / orders
    usable = np.isfinite(bounds)
    upper = min([(size - 1) * count, *np.ceil(bounds[usable & (orders > 0)]).astype(np.int64).tolist()])
    lower = max([0, *np.floor(bounds[usable & (orders < 0)]).astype(np.int64).tolist()])
    return upper - lower + 1


def _leaf_width(event: StepEvent, count: int, interval: float) -> float:
    """Span (nats) of the largest array built for ``count × event`` on ``interval`` (``inf``: no PLD)."""
    if _release_loss_bound(event) > _MAX_RELEASE_LOSS:
        return math.inf
    if event.mechanism == "gaussian" and event.sample_rate == 1.0:  # one Gaussian of std σ/√count
        return _loss_range(StepEvent(event.noise_multiplier / math.sqrt(count), 1.0))
    width = _loss_range(event)
    if count == 1 or count * width / interval <= PLD_MAX_POINTS:  # the window is at most count × the base
        return width
    if width / _PLD_MAX_INTERVAL > PLD_MAX_POINTS:  # not even one release fits: no probe needed
        return math.inf
    return max(width, _self_composed_width(event, count))


def _grid_for(interval: float, width: float) -> float:
    """``interval · 2^k`` for the smallest k ≥ 0 with ``width / (interval · 2^k) ≤ PLD_MAX_POINTS``.

    Doubling keeps the grids of different queries nested and few (so caches hit); ``inf`` past
    :data:`_PLD_MAX_INTERVAL` (the caller then falls back to RDP).
    """
    if not math.isfinite(width):
        return math.inf
    if width / interval <= PLD_MAX_POINTS:
        return interval
    coarse = interval * 2.0 ** math.ceil(math.log2(width / (interval * PLD_MAX_POINTS)))
    return coarse if coarse <= _PLD_MAX_INTERVAL else math.inf


@lru_cache(maxsize=4096)
def _leaf_interval(event: StepEvent, count: int, interval: float) -> float:
    """Grid on which ``count × event`` fits :data:`PLD_MAX_POINTS`, from ``interval`` up (``inf``: none)."""
    return _grid_for(interval, _leaf_width(event, count, interval))


def _coarser(interval: float, points: int) -> float:
    """Grid for a composition that came out with ``points`` (> :data:`PLD_MAX_POINTS`) on ``interval``."""
    return _grid_for(interval, points * interval)


def _fallback_rdp_curve(event: StepEvent, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one release for the PLD accountant's fallback (also Poisson-subsampled Laplace, via pure DP)."""
    if event.mechanism == "laplace" and event.sample_rate < 1.0:
        return _pure_rdp_curve(_pure_step_epsilon(_release_loss_bound(event), event.sample_rate), orders)
    return _rdp_curve(event, orders)


def _rdp_fallback_epsilon(pairs: _EventCounts, delta: float) -> float:
    """ε of ``(event, count)`` pairs by RDP at ``dp_accounting``'s default orders: sound, looser than PLD."""
    orders = tuple(float(a) for a in rdp_lib.DEFAULT_RDP_ORDERS)
    total = np.zeros(len(orders))
    for event, count in sorted(pairs, key=lambda kv: _sort_key(kv[0])):
        total += count * _fallback_rdp_curve(event, orders)
    eps, _ = rdp_lib.compute_epsilon(np.array(orders), total, delta)
    return float(eps)


# ------------------------------------------------------------------------------------------ PLD accountant

_Tree = tuple[
    dict[bytes, pld_lib.PrivacyLossDistribution], dict[StepEvent, tuple[int, pld_lib.PrivacyLossDistribution]]
]


class PLDAccountant(PrivacyAccountant):
    """Privacy-loss-distribution accounting (``dp_accounting.pld``): tight ε, composed per grid σ along a treap.

    Args:
        value_discretization_interval: PLD loss grid; smaller is more accurate and slower (error ~ interval²).
            Queries whose arrays would exceed :data:`PLD_MAX_POINTS` use a coarser one (module docstring).
    """

    kind: ClassVar[AccountantKind] = "pld"

    def __init__(self, value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION) -> None:
        super().__init__()
        self._interval = self._check_interval(value_discretization_interval)
        self._trees: dict[float, _Tree] = {}  # per loss grid: subtree PLDs by digest, leaf PLDs by event
        self._natural: tuple[float, pld_lib.PrivacyLossDistribution | None] | None = None
        self._coarse: dict[float, pld_lib.PrivacyLossDistribution] = {}

    @staticmethod
    def _check_interval(value: Any) -> float:
        interval = _as_float(value, "value_discretization_interval")
        if not (math.isfinite(interval) and 0 < interval <= 0.1):
            raise DPLightningError(
                f"value_discretization_interval must be in (0, 0.1], got {value!r}; the default is "
                f"{DEFAULT_VALUE_DISCRETIZATION}"
            )
        return interval

    @property
    def value_discretization_interval(self) -> float:
        """The PLD loss discretisation interval."""
        return self._interval

    def _canonical(self, event: StepEvent) -> StepEvent:
        if event.mechanism == "lmo" and event.release == "vector":
            raise DPLightningError(
                "LMO noise on a vector (L1 clipping) is accounted with RDP only (DESIGN §6); use accountant='rdp'"
            )
        return super()._canonical(event)

    def _history_changed(self) -> None:
        self._natural = None
        self._coarse = {}

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "value_discretization_interval": self._interval}

    def _load_settings(self, state: dict[str, Any]) -> None:
        super()._load_settings(state)
        self._interval = self._check_interval(state.get("value_discretization_interval", self._interval))
        self._trees = {}

    def history_pld(self) -> pld_lib.PrivacyLossDistribution | None:
        """The composed PLD of the history, cached; ``None`` if empty, if some step had no noise, or if no
        grid up to the coarsest fits :data:`PLD_MAX_POINTS` (ε then comes from RDP). Its grid is
        :attr:`value_discretization_interval` unless the history is too large for it."""
        return self._history_natural()[1]

    def _history_natural(self) -> tuple[float, pld_lib.PrivacyLossDistribution | None]:
        if self._natural is None:
            self._natural = self._compose_history()
        return self._natural

    def _compose_history(self) -> tuple[float, pld_lib.PrivacyLossDistribution | None]:
        """``(grid, PLD)`` of the history on the finest grid that fits :data:`PLD_MAX_POINTS`: ``(inf, None)``
        if none does, ``(value_discretization_interval, None)`` if empty or some step had no noise."""
        if not self._history or any(e.noise_multiplier == 0 for e in self._history):
            self._trees = {}
            return self._interval, None
        interval = max(_leaf_interval(e, c, self._interval) for e, c in self._history.items())
        while math.isfinite(interval):
            try:
                return interval, self._treap(interval)
            except _Oversized as exc:
                interval = _coarser(interval, exc.points)
        return math.inf, None

    def _history_on(self, interval: float) -> pld_lib.PrivacyLossDistribution | None:
        """The history's PLD on ``interval`` (≥ its own grid); ``None`` if empty. May raise _Oversized."""
        if not self._history:
            return None
        natural, pld = self._history_natural()
        if interval == natural:
            return pld
        if interval not in self._coarse:
            self._coarse[interval] = self._treap(interval)
        return self._coarse[interval]

    def _tree(self, interval: float) -> _Tree:
        """The subtree and leaf caches of ``interval``'s grid; those of the two grids used last are kept."""
        tree = self._trees.pop(interval, None) or ({}, {})
        self._trees[interval] = tree
        while len(self._trees) > 2:
            del self._trees[next(iter(self._trees))]
        return tree

    def _treap(self, interval: float) -> pld_lib.PrivacyLossDistribution:
        """Compose the per-event PLDs on ``interval`` along a treap keyed by event (priority = event hash).

        The treap's shape depends only on the set of events, each subtree's PLD is cached under a digest of its
        content, and a step changes one event's count: only the subtrees on that event's path (expected
        O(log k) of them) are recomposed, and the result does not depend on the order of the steps.
        Raises :class:`_Oversized` if a composition outgrows :data:`PLD_MAX_POINTS`.
        """
        items = sorted(self._history.items(), key=lambda kv: _sort_key(kv[0]))
        old_nodes, leaves = self._tree(interval)
        n = len(items)
        priority = [_priority(e) for e, _ in items]
        left, right = [-1] * n, [-1] * n
        stack: list[int] = []
        for i in range(n):  # Cartesian tree (max-heap on priority) in O(n)
            last = -1
            while stack and priority[stack[-1]] < priority[i]:
                last = stack.pop()
            left[i] = last
            if stack:
                right[stack[-1]] = i
            stack.append(i)
        root = stack[0]
        digests: list[bytes] = [b""] * n
        values: list[Any] = [None] * n
        nodes: dict[bytes, pld_lib.PrivacyLossDistribution] = {}
        # iterative post-order: children before parents
        order: list[int] = []
        todo = [root]
        while todo:
            i = todo.pop()
            order.append(i)
            todo.extend(c for c in (left[i], right[i]) if c >= 0)
        for i in reversed(order):
            event, count = items[i]
            lo, hi = left[i], right[i]
            h = hashlib.blake2b(digest_size=16)
            h.update(digests[lo] if lo >= 0 else b"-")
            h.update(repr((*_sort_key(event), count)).encode())
            h.update(digests[hi] if hi >= 0 else b"-")
            key = h.digest()
            pld = old_nodes.get(key)
            if pld is None:
                pld = self._leaf(event, count, interval, leaves)
                if lo >= 0:
                    pld = _checked(values[lo].compose(pld))
                if hi >= 0:
                    pld = _checked(pld.compose(values[hi]))
            nodes[key] = pld
            digests[i], values[i] = key, pld
        self._trees[interval] = (nodes, leaves)  # keep exactly the current tree's subtrees
        return values[root]

    @staticmethod
    def _leaf(
        event: StepEvent,
        count: int,
        interval: float,
        leaves: dict[StepEvent, tuple[int, pld_lib.PrivacyLossDistribution]],
    ) -> pld_lib.PrivacyLossDistribution:
        """PLD of ``count × event``, kept per event while it is in the history (the tree needs it again)."""
        cached = leaves.get(event)
        if cached is not None and cached[0] == count:
            return cached[1]
        leaf = _self_composed_pld(event, count, interval)
        leaves[event] = (count, leaf)
        return leaf

    def _epsilon(self, delta: float, extra: _EventCounts) -> float:
        # PLDs compose only on one grid: the query's is the coarsest any of its parts needs
        natural = self._history_natural()[0] if self._history else self._interval
        interval = max([natural, *(_leaf_interval(e, c, self._interval) for e, c in extra)])
        while math.isfinite(interval):
            try:
                return self._pld_epsilon(delta, extra, interval)
            except _Oversized as exc:
                interval = _coarser(interval, exc.points)
        return _rdp_fallback_epsilon([*self._history.items(), *extra], delta)

    def _pld_epsilon(self, delta: float, extra: _EventCounts, interval: float) -> float:
        pld = self._history_on(interval)
        for event, count in extra:
            part = _self_composed_pld(event, count, interval)
            pld = part if pld is None else _checked(pld.compose(part))
        assert pld is not None
        return float(pld.get_epsilon_for_delta(delta))


# --------------------------------------------------------------------------------------------------- RDP


@lru_cache(maxsize=4096)
def _rdp_curve(event: StepEvent, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one release of ``event`` at ``orders`` (``dp_accounting.rdp.RdpAccountant``); read-only."""
    if event.mechanism == "lmo":
        assert event.lmo is not None
        loss = _release_loss_bound(event)
        if loss > _MAX_RELEASE_LOSS:
            # lmo_accounting holds e^loss in float64, which overflows here (its bound was garbage, even 0);
            # the release is pure K/multiplier-DP, for a scalar and for an L1 vector alike: a sound bound.
            curve = _pure_rdp_curve(_pure_step_epsilon(loss, event.sample_rate), orders)
            curve.setflags(write=False)
            return curve
        curve = lmo_accounting.lmo_rdp(
            event.lmo,
            1.0 / event.noise_multiplier,
            event.sample_rate,
            orders,
            vector=event.release == "vector",
        )
        curve.setflags(write=False)
        return curve
    acc = rdp_lib.RdpAccountant(orders=list(orders))
    acc.compose(event.to_dp_event())
    curve = acc.rdp
    curve.setflags(write=False)
    return curve


def _pure_rdp_curve(epsilon: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of a pure ε-DP release: ``min(ε, α ε²/2)`` (D_α ≤ D_∞; Bun & Steinke 2016, Proposition 3.3)."""
    alphas = np.asarray(orders, dtype=np.float64)
    with np.errstate(over="ignore"):
        return np.minimum(epsilon, alphas * np.float64(epsilon) * epsilon / 2)


class RDPAccountant(PrivacyAccountant):
    """Rényi-DP accounting (``dp_accounting.rdp``): additive per order, cached RDP curve per grid σ.

    Poisson-subsampled Laplace noise has no RDP bound in ``dp_accounting``; use :class:`PLDAccountant` for it.

    Args:
        orders: RDP orders; ``None`` uses ``dp_accounting``'s defaults.
    """

    kind: ClassVar[AccountantKind] = "rdp"

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        super().__init__()
        self._orders = self._check_orders(rdp_lib.DEFAULT_RDP_ORDERS if orders is None else orders)
        self._total: np.ndarray | None = None

    @staticmethod
    def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
        try:
            values = tuple(float(a) for a in orders)
        except (TypeError, ValueError):
            raise DPLightningError(
                f"RDP orders must be numbers > 1, got {orders!r}; omit them for the defaults"
            ) from None
        if not values or any(not (a > 1 and math.isfinite(a)) for a in values):
            raise DPLightningError(
                f"RDP orders must be finite numbers > 1, got {orders!r}; omit them for the defaults"
            )
        return values

    @property
    def orders(self) -> np.ndarray:
        """The RDP orders (a copy)."""
        return np.array(self._orders)

    def _canonical(self, event: StepEvent) -> StepEvent:
        if event.mechanism == "laplace" and event.sample_rate < 1.0:
            raise DPLightningError(
                "dp_accounting has no RDP bound for Poisson-subsampled Laplace noise; use accountant='pld' "
                "(or sample_rate=1)"
            )
        if event.mechanism == "lmo" and event.release == "vector" and event.noise_multiplier > 0:
            _rdp_curve(event, self._orders)  # refuse now (not at the next ε query) if convexity fails; cached
        return super()._canonical(event)

    def _history_changed(self) -> None:
        self._total = None

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "orders": list(self._orders)}

    def _load_settings(self, state: dict[str, Any]) -> None:
        super()._load_settings(state)
        if "orders" in state:
            self._orders = self._check_orders(state["orders"])

    def rdp_curve(self) -> np.ndarray:
        """The history's RDP at each of :attr:`orders` (a copy): ``Σ count · curve(event)``."""
        return self._history_curve().copy()

    def _history_curve(self) -> np.ndarray:
        if self._total is None:
            total = np.zeros(len(self._orders))
            for event, count in sorted(self._history.items(), key=lambda kv: _sort_key(kv[0])):
                total += count * _rdp_curve(event, self._orders)
            self._total = total
        return self._total

    def _epsilon(self, delta: float, extra: _EventCounts) -> float:
        total = self._history_curve()
        if extra:
            total = total.copy()
            for event, count in extra:
                total += count * _rdp_curve(event, self._orders)
        eps, _ = rdp_lib.compute_epsilon(np.array(self._orders), total, delta)
        return float(eps)


# --------------------------------------------------------------------------------------------- functions


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
    acc = make_accountant(accountant)
    event = StepEvent(noise_multiplier, sample_rate, mechanism, lmo, release)
    return acc.epsilon_with(delta, [(event, _as_count(steps, "steps"))])


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
    """Smallest σ on the log grid with ``compute_epsilon(σ, sample_rate, steps, delta, ...) ≤ epsilon``.

    For ``mechanism="lmo"`` (no ``dp_accounting`` event), bisection on the grid index; the answer is checked with
    :func:`compute_epsilon`, so it meets the target even where ε is not monotone in the multiplier.

    A bracket is found by walking σ geometrically (from 1, or for PLD from the cheap RDP answer, which needs
    more noise), then ``dp_accounting.calibrate_dp_mechanism`` searches the grid index (discrete mode), and the
    answer is checked with :func:`compute_epsilon` itself, moving along the grid if needed, so the returned σ
    meets the target and is the smallest grid value that does (the grid spacing is 0.23 %).
    σ is searched in :data:`SIGMA_SEARCH_RANGE`; if its lower end already meets the target, that is returned.

    Raises:
        PrivacyBudgetError: the target is not positive, or unreachable with σ ≤ 1e4.
    """
    d = _check_delta(delta)
    kind = _check_kind(accountant)
    target = _as_float(epsilon, "epsilon")
    n = _as_count(steps, "steps")
    # validates q and mechanism, and that this accountant supports them
    make_accountant(kind)._canonical(StepEvent(1.0, sample_rate, mechanism, lmo, release))
    if not (target > 0 and math.isfinite(target)):
        raise PrivacyBudgetError(
            f"target epsilon must be a positive finite number, got {epsilon!r}; pick ε > 0"
        )
    if n == 0:
        raise DPLightningError("steps must be >= 1 to calibrate noise; pass the planned number of steps")

    def eps_at(k: int) -> float:
        return compute_epsilon(sigma_from_grid_index(k), sample_rate, n, d, kind, mechanism, lmo, release)

    if mechanism == "lmo":
        return _lmo_noise_for_target(eps_at, target, d, sample_rate, n)

    k_min, k_max = (sigma_grid_index(s) for s in SIGMA_SEARCH_RANGE)
    start, jump = 0, round(math.log10(2) * SIGMA_GRID_PER_DECADE)  # from σ = 1 by factors 2, 4, 16, ...
    if kind == "pld" and not (mechanism == "laplace" and sample_rate < 1):
        # RDP is cheap and looser, so its σ is a close upper guess for PLD's (PLD at tiny σ is slow).
        try:
            start = sigma_grid_index(noise_for_target(target, d, sample_rate, n, "rdp", mechanism))
        except PrivacyBudgetError:
            start = k_max
        jump = round(math.log10(1.1) * SIGMA_GRID_PER_DECADE)  # by factors 1.1, 1.2, 1.5, ...
    # bracket: eps_at(lo) > target >= eps_at(hi)
    if eps_at(start) <= target:
        hi = start
        while True:
            if hi == k_min:
                return sigma_from_grid_index(k_min)
            lo = max(hi - jump, k_min)
            if eps_at(lo) > target:
                break
            hi, jump = lo, jump * 2
    else:
        lo = start
        while True:
            if lo == k_max:
                raise PrivacyBudgetError(
                    f"ε={target:g} at δ={d:g} is unreachable in {n} steps at q={sample_rate:g} even with "
                    f"σ={SIGMA_SEARCH_RANGE[1]:g}; raise ε or δ, or take fewer steps"
                )
            hi = min(lo + jump, k_max)
            if eps_at(hi) <= target:
                break
            lo, jump = hi, jump * 2

    if (
        kind == "pld"
        and _leaf_interval(
            StepEvent(sigma_from_grid_index(lo), sample_rate, mechanism), n, DEFAULT_VALUE_DISCRETIZATION
        )
        != DEFAULT_VALUE_DISCRETIZATION
    ):
        # dp_accounting's own PLD accountant would build the oversized PLD this module coarsens: search
        # with our ε directly
        return sigma_from_grid_index(_bisect_grid(eps_at, target, lo, hi))

    if kind == "pld":

        def fresh() -> dp_accounting.PrivacyAccountant:
            return dp_accounting.pld.PLDAccountant(value_discretization_interval=DEFAULT_VALUE_DISCRETIZATION)

    else:

        def fresh() -> dp_accounting.PrivacyAccountant:
            return dp_accounting.rdp.RdpAccountant()

    def event_of(k: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            StepEvent(sigma_from_grid_index(round(k)), sample_rate, mechanism).to_dp_event(), n
        )

    k = round(
        dp_accounting.calibrate_dp_mechanism(
            fresh, event_of, target, d, dp_accounting.ExplicitBracketInterval(lo, hi), discrete=True
        )
    )
    # Make the answer exact for *our* computation (calibration's accountant may differ in the last bits).
    k = min(max(k, lo + 1), hi)
    while k < hi and eps_at(k) > target:
        k += 1
    while k - 1 > lo and eps_at(k - 1) <= target:
        k -= 1
    return sigma_from_grid_index(k)


def _lmo_noise_for_target(
    eps_at: Callable[[int], float], target: float, delta: float, q: float, n: int
) -> float:
    """Smallest grid multiplier found by doubling then bisection on the grid index with ``eps_at(k) ≤ target``."""
    k_min, k_max = (sigma_grid_index(s) for s in SIGMA_SEARCH_RANGE)
    jump = round(math.log10(2) * SIGMA_GRID_PER_DECADE)
    hi = 0
    while eps_at(hi) > target:
        if hi == k_max:
            raise PrivacyBudgetError(
                f"ε={target:g} at δ={delta:g} is unreachable in {n} steps at q={q:g} with LMO noise even at "
                f"multiplier {SIGMA_SEARCH_RANGE[1]:g}; raise ε or δ, or take fewer steps"
            )
        hi = min(hi + jump, k_max)
    lo = hi - jump
    while lo > k_min and eps_at(lo) <= target:
        hi, lo = lo, max(lo - jump, k_min)
    if lo <= k_min and eps_at(k_min) <= target:
        return sigma_from_grid_index(k_min)
    return sigma_from_grid_index(_bisect_grid(eps_at, target, lo, hi))


def _bisect_grid(eps_at: Callable[[int], float], target: float, lo: int, hi: int) -> int:
    """A grid index k in (lo, hi] with ``eps_at(k) ≤ target < eps_at(k − 1)``.

    Needs ``eps_at(hi) ≤ target < eps_at(lo)``.
    """
    while hi - lo > 1:  # invariant: eps_at(hi) ≤ target < eps_at(lo)
        mid = (lo + hi) // 2
        if eps_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def pure_epsilon_laplace(scale: float, sample_rate: float, steps: int) -> float:
    """Pure ε-DP (δ = 0) of ``steps`` Poisson-subsampled Laplace releases (L1 sensitivity 1, scale ``scale``).

    Per step ``log(1 + q (e^{1/scale} − 1))`` (amplification by subsampling of a (1/scale)-DP release), summed
    over steps (basic composition). ``dp_accounting`` has no pure-DP accountant; its PLD at δ = 0 agrees.
    """
    event = StepEvent(scale, sample_rate, "laplace")
    n = _as_count(steps, "steps")
    if n == 0:
        return 0.0
    if event.noise_multiplier == 0:
        return math.inf
    return n * _pure_step_epsilon(1.0 / event.noise_multiplier, event.sample_rate)


def _pure_step_epsilon(x: float, q: float) -> float:
    """``log(1 + q (e^x − 1))``: one Poisson-subsampled (rate q) release of an x-DP mechanism, no overflow."""
    if q == 1.0:
        return x
    if x > 30:  # log(q e^x + 1 − q) without overflow
        return x + math.log(q + (1 - q) * math.exp(-x))
    return math.log1p(q * math.expm1(x))


def laplace_scale_for_pure_epsilon(epsilon: float, sample_rate: float, steps: int) -> float:
    """Smallest Laplace scale with ``pure_epsilon_laplace(scale, sample_rate, steps) ≤ epsilon`` (inverse formula).

    Raises:
        PrivacyBudgetError: ``epsilon`` is not positive.
    """
    target = _as_float(epsilon, "epsilon")
    n = _as_count(steps, "steps")
    StepEvent(1.0, sample_rate, "laplace")
    if not (target > 0 and math.isfinite(target)):
        raise PrivacyBudgetError(
            f"target epsilon must be a positive finite number, got {epsilon!r}; pick ε > 0"
        )
    if n == 0:
        raise DPLightningError("steps must be >= 1 to calibrate noise; pass the planned number of steps")
    per_step, q = target / n, float(sample_rate)
    if per_step > 30:  # 1/scale = log(1 + (e^ε₀ − 1)/q) without overflow
        inv = per_step + math.log(-math.expm1(-per_step) / q + math.exp(-per_step))
    else:
        inv = math.log1p(math.expm1(per_step) / q)
    scale = 1.0 / inv
    while pure_epsilon_laplace(scale, q, n) > target:  # float rounding: step up to the safe side
        scale = math.nextafter(scale, math.inf)
    return scale
