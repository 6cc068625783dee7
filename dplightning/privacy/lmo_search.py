"""Offline search for the LMO noise with the least variance meeting a target (ε, δ) after T Poisson-sampled steps.

U's scale and the noise multiplier are redundant (``s · Laplace(1/U) = Laplace(s/U)``), so the search fixes
``E[U] = 1`` and optimises the *shape* of U — 4 free numbers, all unconstrained reals ``z``:

- ``k = exp(z0)`` (Gamma shape, clipped to [0.3, 200]);
- shares of ``E[U]`` carried by the Gamma, Exponential and Uniform parts: ``softmax(z1, z2, 0)`` (a share below
  :data:`MIN_SHARE` drops its component, so plain Laplace noise is reachable);
- Uniform half-width relative to its mean ``w = sigmoid(z3)``: the Uniform part is ``share · Uniform(1 − w, 1 + w)``.

For each shape the multiplier s is calibrated (:func:`~dplightning.privacy.accounting.smallest_passing` on the
accountant's σ grid, to 1 %, checked by the accountant itself) and the objective is the variance per unit
sensitivity ``s² · Var(n)``. Start points (plain Laplace, Gamma shapes, an even mixture) are evaluated first,
then Nelder–Mead (``scipy.optimize``) refines the best until the time budget is spent. The returned mechanism is
re-checked with :func:`~dplightning.privacy.accounting.compute_epsilon`.

Releases: ``"scalar"`` (1-D: DP-ZO scalar; PLD accounting) or ``"vector"`` (L1-clipped vector with i.i.d. noise; RDP
with the convexity check — shapes that fail the check are infeasible).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize

from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.privacy.accounting import (
    SIGMA_GRID_PER_DECADE,
    AccountantKind,
    Release,
    compute_epsilon,
    noise_for_target,
    quantize_sigma_down,
    sigma_from_grid_index,
    sigma_grid_index,
    smallest_passing,
)
from dplightning.privacy.mechanisms import LMOMechanism

__all__ = ["MIN_SHARE", "SearchResult", "lmo_search", "shape_from_params"]

MIN_SHARE = 1e-3
"""Components carrying less than this share of ``E[U]`` are dropped."""

_K_RANGE = (0.3, 200.0)


def shape_from_params(z: np.ndarray) -> LMOMechanism:
    """The ``E[U] = 1`` mechanism of the unconstrained parameters ``z`` ``[4]`` (see the module docstring)."""
    k = float(np.clip(math.exp(float(np.clip(z[0], -5, 10))), *_K_RANGE))
    logits = np.array([z[1], z[2], 0.0], dtype=np.float64)
    shares = np.exp(logits - logits.max())
    shares /= shares.sum()
    shares = np.where(shares < MIN_SHARE, 0.0, shares)
    shares /= shares.sum()
    w = float(1.0 / (1.0 + math.exp(-float(np.clip(z[3], -30, 30)))))
    return LMOMechanism(
        a1=float(shares[0]) / k,  # Gamma(k, θ=1) has mean k
        a3=float(shares[1]),  # Exp(rate 1) has mean 1
        a4=float(shares[2]),
        gamma_shape=k,
        gamma_scale=1.0,
        exp_rate=1.0,
        uniform_low=1.0 - w,
        uniform_high=1.0 + w,
    )


_STARTS: tuple[tuple[float, float, float, float], ...] = (
    (0.0, -20.0, -20.0, -12.0),  # plain Laplace (Uniform part of width ~0)
    (math.log(20.0), 20.0, 0.0, 0.0),  # Gamma, k = 20 (concentrated U)
    (math.log(5.0), 20.0, 0.0, 0.0),  # Gamma, k = 5
    (math.log(2.0), 20.0, 0.0, 0.0),  # Gamma, k = 2
    (math.log(5.0), 0.0, -3.0, 0.0),  # even Gamma/Uniform mix, some Exp
    (0.0, -20.0, -20.0, 0.0),  # Uniform(0, 2)
)


@dataclass
class SearchResult:
    """Outcome of :func:`lmo_search`. Noise of the release: ``noise_multiplier · C · n`` with n ~ ``mechanism``."""

    mechanism: LMOMechanism
    noise_multiplier: float
    epsilon: float
    std: float  # per-coordinate noise std per unit sensitivity: noise_multiplier · std(n)
    gaussian_sigma: float
    evaluations: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def variance_ratio(self) -> float:
        """LMO noise variance / Gaussian noise variance (both per unit sensitivity, same (ε, δ, q, T))."""
        return (self.std / self.gaussian_sigma) ** 2


class _OutOfTime(Exception):
    pass


# The multiplier's walk: steps of 25 % from the guess, then bisection down to 4 grid steps (≈ 1 %), σ in
# [1e-3, 1e4]. The objective only ranks shapes, so 1 % is enough, and each check composes a whole LMO PLD.
_WALK_STEP = round(math.log10(1.25) * SIGMA_GRID_PER_DECADE)
_WALK_TOLERANCE = 4
_WALK_RANGE = (sigma_grid_index(1e-3), sigma_grid_index(1e4))


def _calibrate(eps_at: Callable[[float], float], target: float, guess: float) -> float | None:
    """Smallest grid multiplier (to 1 %) with ``eps_at(s) ≤ target``, walking from ``guess``; None if > 1e4.

    The walk stops at its bounds rather than landing on them: below 1e-3 it keeps the last multiplier that
    passed (nothing is gained there), above 1e4 the shape is infeasible.
    """
    return smallest_passing(
        lambda s: eps_at(s) <= target,
        sigma_from_grid_index,
        sigma_grid_index(max(guess, 0.1)),
        _WALK_STEP,
        lower=_WALK_RANGE[0],
        upper=_WALK_RANGE[1],
        growth=1,
        tolerance=_WALK_TOLERANCE,
        clamp=False,
    )


def lmo_search(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    release: Release = "scalar",
    time_budget: float = 90.0,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """The LMO mechanism (``E[U] = 1`` shape and multiplier) with the least noise variance meeting (ε, δ).

    Args:
        epsilon, delta: target after ``steps`` releases at Poisson rate ``sample_rate``.
        release: ``"scalar"`` (PLD) or ``"vector"`` (L1, RDP with the convexity check).
        time_budget: seconds for the whole search (the final re-check runs after it).
        log: optional progress printer.

    Raises:
        PrivacyBudgetError: no shape meets the target with multiplier ≤ 1e4.
    """
    if release not in ("scalar", "vector"):
        raise DPLightningError(f"unknown release {release!r}; use 'scalar' or 'vector'")
    if not (time_budget > 0 and math.isfinite(time_budget)):
        raise DPLightningError(f"time budget must be a positive number of seconds, got {time_budget!r}")
    accountant: AccountantKind = "pld" if release == "scalar" else "rdp"
    start = time.monotonic()
    gaussian_sigma = noise_for_target(epsilon, delta, sample_rate, steps, "pld", "gaussian")
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"value": math.inf}

    def objective(z: np.ndarray) -> float:
        elapsed = time.monotonic() - start
        if elapsed > time_budget and (math.isfinite(best["value"]) or elapsed > 2 * time_budget):
            raise _OutOfTime
        mech = shape_from_params(np.asarray(z, dtype=np.float64))
        std_n = mech.std()
        if not math.isfinite(std_n):
            return 1e30

        def eps_at(s: float) -> float:
            # A vector release's RDP is the scalar one once convexity holds: calibrate on the scalar curve (no
            # check per probe), then check convexity once at the calibrated multiplier.
            return compute_epsilon(s, sample_rate, steps, delta, accountant, "lmo", mech, "scalar")

        guess = best.get("multiplier", gaussian_sigma / std_n)
        s = _calibrate(eps_at, epsilon, guess)
        if s is not None and release == "vector":
            try:
                compute_epsilon(s, sample_rate, steps, delta, accountant, "lmo", mech, "vector")
            except DPLightningError:  # the convexity check refused this shape
                s = None
        value = math.inf if s is None else (s * std_n) ** 2
        history.append({"lmo": mech.to_dict(), "noise_multiplier": s, "variance": value})
        if value < best["value"] * (1 - 1e-9):  # a real improvement, not float noise between equal variances
            best.update(value=value, mechanism=mech, multiplier=s, z=np.array(z, dtype=np.float64))
            if log is not None:
                log(
                    f"[{time.monotonic() - start:6.1f}s] variance {value:.5g} (Gaussian {gaussian_sigma**2:.5g}) {mech}"
                )
        return value if math.isfinite(value) else 1e30

    try:
        scores = [(objective(np.array(z)), z) for z in _STARTS]
        z0 = np.array(min(scores, key=lambda t: t[0])[1])
        simplex = np.stack([z0] + [z0 + 1.0 * np.eye(4)[i] for i in range(4)])
        while True:  # restarts around the incumbent until the budget is spent
            optimize.minimize(
                objective,
                z0,
                method="Nelder-Mead",
                options={"initial_simplex": simplex, "xatol": 1e-2, "fatol": 1e-4},
            )
            z0 = best.get("z", z0)
            simplex = np.stack([z0] + [z0 + 0.3 * np.eye(4)[i] for i in range(4)])
    except _OutOfTime:
        pass
    if not math.isfinite(best["value"]):
        raise PrivacyBudgetError(
            f"no LMO noise meets ε={epsilon:g}, δ={delta:g} in {steps} steps at q={sample_rate:g}"
            + (" (every tried shape failed the L1 convexity check)" if release == "vector" else "")
            + "; raise ε or δ, or take fewer steps"
        )
    mech, s = best["mechanism"], float(best["multiplier"])
    eps = compute_epsilon(s, sample_rate, steps, delta, accountant, "lmo", mech, release)
    if eps > epsilon:  # cannot happen: every calibrated value was checked by the same function
        raise PrivacyBudgetError(f"internal: re-check gave ε={eps} > {epsilon}")
    return SearchResult(
        mechanism=mech,
        noise_multiplier=s,
        epsilon=eps,
        std=s * mech.std(),
        gaussian_sigma=quantize_sigma_down(gaussian_sigma) or gaussian_sigma,
        evaluations=len(history),
        seconds=time.monotonic() - start,
        history=history,
    )
