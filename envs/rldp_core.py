"""Pieces of the RLDP control problem shared by the live controller and the standalone environment.

- :func:`action_groups` — which clipping groups one action coordinate moves.
- :class:`ActionMapper` — action in ``[-1, 1]^(k+1)`` → per-group clip thresholds and a target σ.
- :func:`build_observation` — the fixed-size, normalised observation vector (layout in ``OBS_FIELDS``).

Also importable from here, for the controller and the environment: :func:`split_sigma`,
:class:`ClipCountRelease`, :func:`count_noise_source` / :func:`count_noise_state` (privatised clip fractions,
:mod:`dplightning.privacy.count_release`) and :class:`BudgetGuard` (smallest σ ≥ the proposed one that keeps
ε ≤ target even if every remaining step ran at σ_max; :mod:`dplightning.privacy.budget_guard`).

Soundness: every input of :func:`build_observation` is public (held-out loss on a split declared public,
ε, progress, the controller's own σ and thresholds), post-processing of a privatised release (norms of the
noisy gradient), or separately privatised and charged (clip fractions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dplightning.errors import DPLightningError
from dplightning.privacy.budget_guard import GUARD_GRID_PER_DECADE, BudgetGuard
from dplightning.privacy.count_release import (
    COUNT_GRID,
    ClipCountRelease,
    count_noise_source,
    count_noise_state,
    split_sigma,
)

__all__ = [
    "ACTION_SCOPES",
    "COUNT_GRID",
    "GUARD_GRID_PER_DECADE",
    "OBS_FIELDS",
    "OBS_LIMIT",
    "ActionMapper",
    "BudgetGuard",
    "ClipCountRelease",
    "action_groups",
    "build_observation",
    "count_noise_source",
    "count_noise_state",
    "observation_size",
    "reward",
    "split_sigma",
]

ActionScope = str  # "per_adapter" | "per_layer_group" | "global"
ACTION_SCOPES = ("per_adapter", "per_layer_group", "global")
OBS_LIMIT = 10.0
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


def action_groups(
    group_names: Sequence[str], scope: ActionScope, num_layer_groups: int = 4
) -> list[list[str]]:
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


def reward(
    public_loss_before: float, public_loss_after: float, epsilon_spent: float, privacy_weight: float
) -> float:
    """``(L_before − L_after) − λ·Δε``: held-out log-perplexity improvement over the interval minus the weighted
    privacy spent in it."""
    return float(public_loss_before - public_loss_after - privacy_weight * epsilon_spent)
