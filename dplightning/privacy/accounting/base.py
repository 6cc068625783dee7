"""The accountant interface, :class:`PrivacyAccountant`, and the σ grid every accountant records on.

An accountant records :class:`~dplightning.privacy.accounting.events.StepEvent` releases as a compressed history
of ``(event, count)`` pairs and answers ``epsilon(delta)``; its state is plain data (:meth:`state_dict`), so
a restored accountant reports the same ε bit for bit.

**σ grid.** Accountants first quantise σ **down** onto a log grid with :data:`SIGMA_GRID_PER_DECADE` points
per decade (relative spacing 0.23 %). Less noise can only increase ε, so the reported ε is an upper bound on
the ε of the σ actually used (conservative; +0.15 % for σ = 1.1 in the Abadi et al. MNIST setting). The grid
keeps the history small when a controller changes σ every step, and makes the per-σ caches hit.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal, Protocol, cast, get_args, runtime_checkable

from dplightning.errors import DPLightningError
from dplightning.privacy.accounting.events import (
    Mechanism,
    Release,
    StepEvent,
    _as_count,
    _as_float,
    _sort_key,
)
from dplightning.privacy.mechanisms import LMOMechanism

__all__ = [
    "ACCOUNTANTS",
    "EXACT_MAX_EVENTS",
    "SIGMA_GRID_PER_DECADE",
    "Accountant",
    "AccountantKind",
    "PrivacyAccountant",
    "quantize_sigma_down",
    "sigma_from_grid_index",
    "sigma_grid_index",
]

AccountantKind = Literal["pld", "rdp"]
ACCOUNTANTS: tuple[str, ...] = get_args(AccountantKind)

SIGMA_GRID_PER_DECADE = 1000
"""Points per decade of the log grid onto which the accountants quantise σ (rounding down: conservative)."""

EXACT_MAX_EVENTS = 8
"""Histories of at most this many distinct events are composed as ``dp_accounting`` composes them (its numbers,
bit for bit). A controller that changes σ as it trains yields hundreds: those go through the vectorised paths
(one spectral product of the PLDs; RDP curves of all σ at once), which never report less than ``dp_accounting``
would and differ from it by ~1e-9 relative, at a fraction of the cost."""

_STATE_VERSION = 1
_EventCounts = list[tuple[StepEvent, int]]


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
    return cast(AccountantKind, kind)


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


def history_entry(event: StepEvent, count: int) -> dict[str, Any]:
    """``count`` releases of ``event`` as one entry of :meth:`PrivacyAccountant.state_dict`'s ``history`` (plain,
    JSON-able types; :meth:`PrivacyAccountant.load_state_dict` reads it back)."""
    return {
        "noise_multiplier": event.noise_multiplier,
        "sample_rate": event.sample_rate,
        "mechanism": event.mechanism,
        **({} if event.lmo is None else {"lmo": event.lmo.to_dict(), "release": event.release}),
        "count": count,
    }


@runtime_checkable
class Accountant(Protocol):
    """The accountant interface callbacks use (PLD, RDP and DP-ZO's pure-ε accountant all offer it)."""

    @property
    def steps(self) -> int: ...

    @property
    def history(self) -> list[tuple[StepEvent, int]]: ...

    def epsilon(self, delta: float) -> float: ...

    def epsilon_with(self, delta: float, extra: Sequence[tuple[StepEvent, int]]) -> float: ...


class _StepRecorder(abc.ABC):
    """``step(σ, q, n, ...)`` as ``record(StepEvent(σ, q, ...), n)``: the one way every accountant records a step."""

    default_mechanism: ClassVar[Mechanism] = "gaussian"

    def step(
        self,
        noise_multiplier: float,
        sample_rate: float,
        num_steps: int = 1,
        mechanism: Mechanism | None = None,
        lmo: LMOMechanism | None = None,
        release: Release = "scalar",
    ) -> None:
        """Record ``num_steps`` releases of the same event (``mechanism``: :attr:`default_mechanism` if omitted)."""
        chosen = self.default_mechanism if mechanism is None else mechanism
        self.record(StepEvent(noise_multiplier, sample_rate, chosen, lmo, release), num_steps)

    @abc.abstractmethod
    def record(self, event: StepEvent, num_steps: int = 1) -> None:
        """Record ``num_steps`` releases of ``event``."""


class PrivacyAccountant(_StepRecorder):
    """Tracks the privacy spent by a sequence of :class:`StepEvent` releases (add-or-remove-one adjacency).

    Implementations: :class:`~dplightning.privacy.accounting.pld.PLDAccountant` (tight) and
    :class:`~dplightning.privacy.accounting.rdp.RDPAccountant`. Create one with
    :func:`~dplightning.privacy.accounting.make_accountant`.
    """

    kind: ClassVar[AccountantKind]
    # tests and benchmarks raise it on an instance to compare with the exact path
    _exact_max_events: float = EXACT_MAX_EVENTS

    def __init__(self) -> None:
        self._history: dict[StepEvent, int] = {}
        self._steps = 0
        self._epsilon_cache: dict[float, float] = {}

    # ----------------------------------------------------------------------------------------- recording

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

    def _exact(self) -> bool:
        """Whether the history is composed as ``dp_accounting`` would (:data:`EXACT_MAX_EVENTS`)."""
        return len(self._history) <= self._exact_max_events

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
            "history": [history_entry(e, c) for e, c in self._history.items()],
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

    def _history_changed(self) -> None:
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
