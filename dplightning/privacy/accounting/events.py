"""The releases an accountant composes: :class:`StepEvent`, small and immutable, as ``dp_accounting``'s ``DpEvent``.

A step is one release of noise of multiplier σ on a Poisson sample of rate q, by one of three mechanisms
(``"gaussian"``, ``"laplace"``, ``"lmo"``). Gaussian and Laplace events have a ``dp_accounting`` counterpart
(:meth:`StepEvent.to_dp_event`); LMO noise has none and is accounted by
:mod:`dplightning.privacy.lmo_accounting`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import dp_accounting

from dplightning.errors import DPLightningError
from dplightning.privacy.mechanisms import LMOMechanism

__all__ = ["MECHANISMS", "RELEASES", "Mechanism", "Release", "StepEvent"]

Mechanism = Literal["gaussian", "laplace", "lmo"]
Release = Literal["scalar", "vector"]
MECHANISMS: tuple[str, ...] = get_args(Mechanism)
RELEASES: tuple[str, ...] = get_args(Release)


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
            vector with L1 sensitivity C; RDP only: the vector is bounded by one coordinate shifted by C only
            where the 1-D RDP curve is convex in the shift, which :func:`~dplightning.privacy.lmo_accounting.lmo_rdp`
            checks).
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


def _sort_key(event: StepEvent) -> tuple[Any, ...]:
    """A total order on events: composition follows it, so that ε does not depend on the order of the steps."""
    base = (event.mechanism, event.sample_rate, event.noise_multiplier)
    if event.lmo is None:
        return base
    return (*base, event.release, *event.lmo.key())


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
