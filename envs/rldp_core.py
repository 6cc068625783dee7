"""Pieces of the RLDP control problem shared by the live controller and the standalone environment.

- :func:`action_groups` — which clipping groups one action coordinate moves.
- :class:`ActionMapper` — action in ``[-1, 1]^(k+1)`` → per-group clip thresholds and a target σ.
- :func:`split_sigma` — the gradient / clip-count noise split whose combination costs exactly σ.
- :class:`ClipCountRelease` — privatised clip fractions (Gaussian noise on counts; charged via the split),
  drawing from :func:`count_noise_source` (seeded and checkpointed, or the OS CSPRNG).
- :class:`BudgetGuard` — smallest σ ≥ the proposed one that keeps ε ≤ target even if every remaining step
  ran at σ_max; ``None`` when nothing does.
- :func:`build_observation` — the fixed-size, normalised observation vector (layout in ``OBS_FIELDS``).

Soundness: every input of :func:`build_observation` is public (held-out loss on a split declared public,
ε, progress, the controller's own σ and thresholds), post-processing of a privatised release (norms of the
noisy gradient), or separately privatised and charged (clip fractions).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dplightning.errors import DPLightningError
from dplightning.privacy.accounting import PrivacyAccountant, StepEvent
from dplightning.privacy.discretization import from_grid, to_grid
from dplightning.privacy.noise_addition import NoiseSource

COUNT_GRID = 2.0**-20  # grid of released clip counts: an example's value in [0, 1] spans 2^20 grid steps

ActionScope = str  # "per_adapter" | "per_layer_group" | "global"
ACTION_SCOPES = ("per_adapter", "per_layer_group", "global")
OBS_LIMIT = 10.0
GUARD_GRID_PER_DECADE = 200  # σ steps of 1.2 %
# Observation layout: 5 scalars, then 3 blocks of k (one entry per action group).
OBS_FIELDS = (
    "public_loss / initial public loss",
    "10 x (public loss change over the interval) / initial public loss",
    "epsilon spent / target epsilon",
    "progress: optimizer steps / planned steps",
    "log(sigma / base sigma)",
    "[k] log(clip threshold / base threshold)",
    "[k] privatised clip fraction (noisy clipped count / expected batch size), averaged over the interval",
    "[k] log1p(norm of the noisy released gradient / clip threshold)",
)


def observation_size(num_groups: int) -> int:
    return 5 + 3 * num_groups


def action_groups(group_names: Sequence[str], scope: ActionScope, num_layer_groups: int = 4) -> list[list[str]]:
    """Partition clipping groups into the sets one action coordinate controls (order preserved)."""
    names = list(group_names)
    if scope == "per_adapter":
        return [[g] for g in names]
    if scope == "global":
        return [names]
    if scope == "per_layer_group":
        k = max(1, min(num_layer_groups, len(names)))
        return [list(chunk) for chunk in np.array_split(np.array(names, dtype=object), k)]
    raise DPLightningError(f"unknown action_scope '{scope}'; use one of {', '.join(ACTION_SCOPES)}")


def _log_interp(a: float, bounds: tuple[float, float]) -> float:
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    return math.exp(lo + (float(np.clip(a, -1.0, 1.0)) + 1.0) * 0.5 * (hi - lo))


@dataclass
class ActionMapper:
    """Maps ``action[:k]`` to per-group clip multipliers in ``clip_bounds`` and ``action[k]`` to a σ multiplier
    in ``sigma_bounds``, both geometric (log-linear) in the action; multipliers apply to the base values."""

    base_sigma: float
    base_clips: dict[str, float]
    groups: list[list[str]]
    sigma_bounds: tuple[float, float] = (0.7, 1.5)
    clip_bounds: tuple[float, float] = (0.25, 4.0)

    @property
    def action_size(self) -> int:
        return len(self.groups) + 1

    @property
    def sigma_max(self) -> float:
        return self.base_sigma * self.sigma_bounds[1]

    def __call__(self, action: np.ndarray) -> tuple[float, dict[str, float]]:
        """``action`` ``[k+1]`` → (target σ, ``{group: C_g}``)."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape[0] != self.action_size:
            raise ValueError(f"action has {action.shape[0]} entries, expected {self.action_size}")
        clips = {}
        for j, members in enumerate(self.groups):
            mult = _log_interp(action[j], self.clip_bounds)
            clips.update({g: self.base_clips[g] * mult for g in members})
        return self.base_sigma * _log_interp(action[-1], self.sigma_bounds), clips


def split_sigma(sigma: float, count_budget_fraction: float) -> tuple[float, float]:
    """(σ_grad, σ_count) with ``σ_grad^-2 + σ_count^-2 = σ^-2``: the count release takes the fraction ``f`` of
    the step's privacy (in σ^-2 units), so the step still costs exactly σ (Andrew et al. 2021, DESIGN §4)."""
    f = count_budget_fraction
    if not 0.0 < f < 1.0:
        raise DPLightningError(f"count_budget_fraction must be in (0, 1), got {f}")
    # Inflate by 1e-12 so float rounding in the recombination can never land below σ (the accountant rounds
    # a σ even one ulp under a grid value down to the next grid value, which the guard did not check).
    pad = 1.0 + 1e-12
    return pad * sigma / math.sqrt(1.0 - f), pad * sigma / math.sqrt(f)


def count_noise_source(
    seed: int, secure: bool, state: Mapping[str, Any] | None = None, steps_done: int = 0
) -> NoiseSource:
    """The noise source of a clip-count release.

    ``secure`` (the strategy's ``secure_rng``) or a ``state`` saved by a secure run gives the OS CSPRNG:
    nothing is restored, and a resumed secure run never falls back to a seeded stream. Otherwise the stream
    is seeded and continues from ``state`` (see :func:`count_noise_state`): a resumed run must draw what the
    uninterrupted run would have drawn, because re-drawing the noise of steps 1…k lets anyone difference two
    releases of the same counts. A run resumed after ``steps_done`` releases without a saved stream gets a
    stream keyed to the resume point instead of the start's.
    """
    state = state or {}
    if secure or state.get("secure"):
        return NoiseSource(seed=seed, secure=True)
    if state.get("generator") is not None:
        source = NoiseSource(seed=seed)
        source.generator.set_state(state["generator"])
        return source
    if steps_done > 0:
        digest = hashlib.sha256(f"dplightning-count-noise:{seed}:{steps_done}".encode()).digest()
        return NoiseSource(seed=int.from_bytes(digest[:8], "little"))
    return NoiseSource(seed=seed)


def count_noise_state(source: NoiseSource) -> dict[str, Any]:
    """What a checkpoint keeps of a count-noise source: the seeded stream's position, or only the fact that
    the CSPRNG was used (there is nothing to restore, and nothing that could replay)."""
    if source.secure:
        return {"secure": True}
    return {"secure": False, "generator": source.generator.get_state()}


class ClipCountRelease:
    """Releases, per action group ``j``, the noisy count ``Σ_i mean_{g∈j} 1[||g_i|| > C_g]`` plus noise of std ``s``.

    Each example adds at most 1 to each of the ``k`` counts, so the count vector has L2 sensitivity ``√k`` and
    the noise std is ``s = σ_count·√k``. Fractions are averaged over the decision interval (less noise).

    ``centered=True`` (Andrew et al. 2021) releases ``Σ_i (1[clipped] − ½)`` instead: each example moves each
    count by at most ½, so the sensitivity halves to ``√k/2`` and the same ``σ_count`` needs half the noise
    std. The fraction is then ``noisy centred sum / m + ½`` with ``m`` the expected batch size.

    ``noise`` is seeded or the OS CSPRNG (:func:`count_noise_source`).
    """

    def __init__(
        self, groups: list[list[str]], expected_batch_size: float, noise: NoiseSource, centered: bool = False
    ) -> None:
        self.groups = groups
        self.expected_batch_size = expected_batch_size
        self.noise = noise
        self.centered = centered
        self._sum = np.zeros(len(groups))
        self._n = 0

    def release(self, norms: Mapping[str, Tensor], thresholds: Mapping[str, float], sigma_count: float) -> np.ndarray:
        """One step's noisy clip fractions ``[k]`` (also accumulated for :meth:`interval_mean`).

        The counts are released on the grid ``γ = 2^-20`` (an integer sum plus discrete Gaussian noise, see
        :mod:`dplightning.privacy.discretization`), so no low bit of the exact count survives in the release.
        """
        k = len(self.groups)
        units = torch.zeros(k, dtype=torch.int64)
        for j, members in enumerate(self.groups):
            present = [g for g in members if g in norms]
            if present:
                clipped = torch.stack([(norms[g] > thresholds[g]).double() for g in present]).mean(0)
                # Each example adds a value in [0, 1] (centred: [-1/2, 1/2]), still within it on the grid.
                units[j] = to_grid(clipped - 0.5 if self.centered else clipped, COUNT_GRID).sum()
        sensitivity = math.sqrt(k) * (0.5 if self.centered else 1.0)
        noise = self.noise.discrete_gaussian((k,), sigma_count * sensitivity / COUNT_GRID)
        counts = from_grid(units + noise, COUNT_GRID).numpy()
        fractions = counts / self.expected_batch_size + (0.5 if self.centered else 0.0)
        self._sum += fractions
        self._n += 1
        return fractions

    def interval_mean(self) -> np.ndarray:
        """Mean noisy fraction since the last call ``[k]`` (post-processing of released values)."""
        out = self._sum / max(self._n, 1)
        self._sum, self._n = np.zeros(len(self.groups)), 0
        return out


@dataclass
class BudgetGuard:
    """Never lets a σ through unless ε(history + next interval at σ + rest at σ_max) ≤ target."""

    accountant: PrivacyAccountant
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

    def safe_sigma(self, sigma: float, interval: int) -> float | None:
        """The smallest σ' ≥ σ on the guard's log grid (``GUARD_GRID_PER_DECADE``) that passes, or ``None`` if
        even σ_max fails. Rounding σ up onto a coarse grid is conservative and keeps the accountant's caches hot
        (a controller proposes a new real number every decision)."""
        lo = math.ceil(math.log10(sigma) * GUARD_GRID_PER_DECADE - 1e-9)
        hi = math.ceil(math.log10(self.sigma_max) * GUARD_GRID_PER_DECADE - 1e-9)
        if lo >= hi:
            lo = hi

        def grid(k: int) -> float:
            return 10 ** (k / GUARD_GRID_PER_DECADE)

        if self._epsilon(grid(lo), interval) <= self.target_epsilon:
            return grid(lo)
        if self._epsilon(grid(hi), interval) > self.target_epsilon:
            return None
        while hi - lo > 1:  # invariant: grid(lo) fails, grid(hi) passes
            mid = (lo + hi) // 2
            if self._epsilon(grid(mid), interval) <= self.target_epsilon:
                hi = mid
            else:
                lo = mid
        return grid(hi)


def build_observation(
    public_loss: float,
    previous_public_loss: float,
    initial_public_loss: float,
    epsilon_ratio: float,
    progress: float,
    sigma_ratio: float,
    clip_ratios: Sequence[float],
    clip_fractions: Sequence[float],
    noisy_grad_norm_ratios: Sequence[float],
) -> np.ndarray:
    """The observation vector, layout ``OBS_FIELDS``, float32, clipped to ``[-10, 10]``."""
    scale = max(initial_public_loss, 1e-8)
    head = [
        public_loss / scale,
        10.0 * (public_loss - previous_public_loss) / scale,
        epsilon_ratio,
        progress,
        math.log(max(sigma_ratio, 1e-8)),
    ]
    body = (
        [math.log(max(c, 1e-8)) for c in clip_ratios]
        + [float(f) for f in clip_fractions]
        + [math.log1p(max(n, 0.0)) for n in noisy_grad_norm_ratios]
    )
    obs = np.asarray(head + body, dtype=np.float32)
    return np.clip(np.nan_to_num(obs, nan=0.0, posinf=OBS_LIMIT, neginf=-OBS_LIMIT), -OBS_LIMIT, OBS_LIMIT)


def reward(public_loss_before: float, public_loss_after: float, epsilon_spent: float, privacy_weight: float) -> float:
    """``(L_before − L_after) − λ·Δε``: held-out log-perplexity improvement over the interval minus the weighted
    privacy spent in it."""
    return float(public_loss_before - public_loss_after - privacy_weight * epsilon_spent)
