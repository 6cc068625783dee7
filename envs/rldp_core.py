"""The RLDP control problem, shared by the live controller and the simulator so both pose the same problem.

- :class:`ActionMapper` — action in ``[-1, 1]^(2+m)`` → clip norm (a step size under SGD), σ, and optionally
  ``m`` allocation weights of the clip norm across blocks of clipping groups (:func:`allocation_blocks`).
- :func:`build_observation` — the observation vector (layout in :data:`OBS_FIELDS`).
- :func:`reward` — ``100 · (L_prev − L_now) / L0`` on a fixed public evaluation set.
- :class:`UpdateStats` and :func:`optimizer_ratio` — statistics of the released noisy updates.
- :class:`ControlState` — what is carried between decisions (current C and σ, the loss history).

Also importable from here, for the controller and the simulator: :func:`split_sigma`,
:class:`ClipCountRelease`, :func:`count_noise_source` / :func:`count_noise_state` (privatised clip fractions,
:mod:`dplightning.privacy.count_release`) and :class:`BudgetGuard` (:mod:`dplightning.privacy.budget_guard`).

Soundness: every input of :func:`build_observation` is public or post-processing of what DP-SGD released. The
loss is measured on examples declared public; progress, C and ε spent follow from the plan and the controller's
own choices; the cosine between consecutive updates and the optimizer-state ratio are functions of the released
noisy gradients (the momentum buffer and Adam's moments are computed from them alone). The optional clip
fractions are released with their own Gaussian noise and charged inside the step's σ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import Tensor

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
    "COUNT_GRID",
    "GUARD_GRID_PER_DECADE",
    "OBS_FIELDS",
    "OBS_LIMIT",
    "ActionMapper",
    "BudgetGuard",
    "ClipCountRelease",
    "ControlState",
    "UpdateStats",
    "allocation_blocks",
    "build_observation",
    "count_noise_source",
    "count_noise_state",
    "observation_size",
    "optimizer_ratio",
    "reward",
    "split_sigma",
]

OBS_LIMIT = 10.0
REWARD_SCALE = 100.0  # reward and slopes in % of the initial public loss: O(1) per decision
# Observation layout: 8 numbers, then (only with a clip-count channel) one privatised fraction per count block.
OBS_FIELDS = (
    "progress: optimizer steps / planned steps",
    "public loss / initial public loss",
    "slope of the last interval: 100 x (L_now - L_prev) / L0",
    "slope of the interval before",
    "log(C / C0): the clip norm (the SGD step size) relative to the recipe's",
    "epsilon spent / target epsilon",
    "cosine between consecutive noisy updates, averaged over the interval",
    "log(momentum-buffer norm / noisy-gradient norm); AdamW: log(|m| / |sqrt(v)|)",
    "[k] privatised clip fraction per count block (only with count_budget_fraction > 0)",
)
NUM_BASE_FIELDS = 8

# Actions and released fractions arrive as numpy arrays from the agent, or as plain sequences.
Floats: TypeAlias = Sequence[float] | np.ndarray


def observation_size(count_blocks: int = 0) -> int:
    return NUM_BASE_FIELDS + count_blocks


def allocation_blocks(group_names: Sequence[str], allocation: str | int | None) -> list[list[str]] | None:
    """The blocks of clipping groups that share one allocation weight: ``None`` (no allocation), ``"lora_ab"``
    (LoRA A matrices vs B matrices; needs ``clipping: per_layer``) or ``k`` contiguous blocks."""
    names = list(group_names)
    if allocation is None:
        return None
    if allocation == "lora_ab":
        a = [g for g in names if "lora_A" in g]
        b = [g for g in names if "lora_B" in g]
        if not a or not b or len(a) + len(b) != len(names):
            raise DPLightningError(
                "clip_allocation='lora_ab' needs one clipping group per LoRA matrix; set the strategy's "
                "clipping: per_layer"
            )
        return [a, b]
    if isinstance(allocation, int) and not isinstance(allocation, bool) and allocation >= 2:
        if len(names) < allocation:
            raise DPLightningError(
                f"clip_allocation={allocation} blocks needs at least as many clipping groups, got {len(names)}; "
                "set the strategy's clipping: per_adapter or per_layer, or fewer blocks"
            )
        return [list(chunk) for chunk in np.array_split(np.array(names, dtype=object), allocation)]
    raise DPLightningError(
        f"clip_allocation must be null, 'lora_ab' or a number of blocks >= 2, got {allocation!r}"
    )


@dataclass
class ActionMapper:
    """``action[0]`` changes the clip norm multiplicatively, ``C ← C·clip_step^a0`` within
    ``[C0/clip_range, C0·clip_range]``; ``action[1]`` sets ``σ = σ0·sigma_range^a1``; ``action[2:]`` (with
    allocation blocks) weight the blocks, ``w = allocation_range^a``, renormalised so that the total
    sensitivity ``√Σ C_g²`` stays ≤ C. Without allocation every group keeps its share of the recipe's thresholds.

    Action 0 maps to exactly the recipe's σ0 and thresholds (multiplications by exactly 1.0), which is what
    makes the mean action of an untrained agent reproduce plain DP-SGD bit for bit.
    """

    base_sigma: float
    base_thresholds: dict[str, float]
    blocks: list[list[str]] | None = None
    sigma_range: float = 1.5
    clip_range: float = 4.0
    clip_step: float = 1.5
    allocation_range: float = 2.0
    base_clip: float = field(init=False)

    def __post_init__(self) -> None:
        self.base_clip = math.sqrt(sum(c * c for c in self.base_thresholds.values()))

    @property
    def action_size(self) -> int:
        return 2 + (len(self.blocks) if self.blocks else 0)

    @property
    def sigma_max(self) -> float:
        return self.base_sigma * self.sigma_range

    @property
    def clip_bounds(self) -> tuple[float, float]:
        return self.base_clip / self.clip_range, self.base_clip * self.clip_range

    def next_clip(self, clip: float, a0: float) -> float:
        lo, hi = self.clip_bounds
        return min(max(clip * self.clip_step ** float(np.clip(a0, -1.0, 1.0)), lo), hi)

    def sigma(self, a1: float) -> float:
        return self.base_sigma * math.exp(float(np.clip(a1, -1.0, 1.0)) * math.log(self.sigma_range))

    def thresholds(self, clip: float, allocation: Floats = ()) -> dict[str, float]:
        """Per-group thresholds with total sensitivity ``√Σ C_g² ≤ clip``."""
        if not self.blocks:
            scale = clip / self.base_clip  # exactly 1.0 at the recipe's clip norm
            return {g: c * scale for g, c in self.base_thresholds.items()}
        weights: dict[str, float] = {}
        for members, a in zip(self.blocks, allocation):
            w = math.exp(float(np.clip(a, -1.0, 1.0)) * math.log(self.allocation_range))
            weights.update(dict.fromkeys(members, w))
        # The 1e-12 shave keeps float rounding from landing the total an ulp above the clip norm.
        scale = clip / math.sqrt(sum(w * w for w in weights.values())) * (1.0 - 1e-12)
        return {g: w * scale for g, w in weights.items()}

    def check(self, action: np.ndarray) -> np.ndarray:
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape[0] != self.action_size:
            raise DPLightningError(
                f"action has {action.shape[0]} entries, expected {self.action_size}; the policy was trained "
                "for another clip_allocation"
            )
        return action


def build_observation(
    progress: float,
    losses: Sequence[float],
    initial_loss: float,
    log_clip_ratio: float,
    epsilon_ratio: float,
    cosine: float,
    log_optimizer_ratio: float,
    count_fractions: Floats = (),
) -> np.ndarray:
    """The observation vector, layout :data:`OBS_FIELDS`, float32, clipped to ``[-10, 10]``. ``losses``: the
    public losses of the decisions so far, the current one last."""
    scale = max(initial_loss, 1e-8)
    padded = [losses[0]] * max(0, 3 - len(losses)) + list(losses[-3:])
    slopes = [REWARD_SCALE * (padded[i + 1] - padded[i]) / scale for i in (1, 0)]
    values = [
        progress,
        padded[-1] / scale,
        *slopes,
        log_clip_ratio,
        epsilon_ratio,
        cosine,
        log_optimizer_ratio,
        *[float(f) for f in count_fractions],
    ]
    obs = np.asarray(values, dtype=np.float32)
    return np.clip(np.nan_to_num(obs, nan=0.0, posinf=OBS_LIMIT, neginf=-OBS_LIMIT), -OBS_LIMIT, OBS_LIMIT)


def reward(previous_loss: float, loss: float, initial_loss: float) -> float:
    """``100 · (L_prev − L_now) / L0``: the improvement of the fixed public set's loss over the interval, in % of
    its initial value. With γ = 1 and the last decision terminal, the return is the run's total improvement."""
    return float(REWARD_SCALE * (previous_loss - loss) / max(initial_loss, 1e-8))


class UpdateStats:
    """Cosine between consecutive released (noisy) updates, averaged over a decision interval."""

    def __init__(self) -> None:
        self.previous: Tensor | None = None
        self._sum = 0.0
        self._n = 0

    def record(self, update: Tensor) -> None:
        update = update.detach().float()
        if self.previous is not None and self.previous.shape == update.shape:
            denom = float(update.norm() * self.previous.norm())
            if denom > 0:
                self._sum += float(torch.dot(update, self.previous.to(update.device))) / denom
                self._n += 1
        self.previous = update.clone()

    def interval_mean(self) -> float:
        out = self._sum / self._n if self._n else 0.0
        self._sum, self._n = 0.0, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        previous = None if self.previous is None else self.previous.cpu()
        return {"previous": previous, "sum": self._sum, "n": self._n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous, self._sum, self._n = state["previous"], state["sum"], state["n"]


def noisy_update(params: Sequence[torch.nn.Parameter]) -> Tensor:
    """The released gradient as one vector (what DP-SGD wrote into ``.grad``; empty if nothing was released)."""
    parts = [p.grad.detach().flatten() for p in params if p.grad is not None]
    return torch.cat(parts) if parts else torch.zeros(0)


def optimizer_ratio(optimizer: torch.optim.Optimizer, grad_norm: float | None = None) -> float:
    """``log(‖momentum buffer‖ / ‖noisy gradient‖)`` under SGD, ``log(‖m‖ / ‖√v‖)`` under Adam(W); 0 when the
    optimizer keeps no such state yet. Both are functions of the released gradients only. ``grad_norm``: the
    released gradient's norm when the caller has it (the strategy's ``last_noisy_grad_norms``), else ``.grad``'s."""
    momentum = grads = adam_m = adam_v = 0.0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if state.get("momentum_buffer") is not None:
                momentum += float(state["momentum_buffer"].float().pow(2).sum())
                if p.grad is not None:
                    grads += float(p.grad.float().pow(2).sum())
            elif "exp_avg" in state:
                adam_m += float(state["exp_avg"].float().pow(2).sum())
                adam_v += float(state["exp_avg_sq"].float().sum())
    if momentum > 0:
        num, den = momentum, grads if grad_norm is None else grad_norm**2
    else:
        num, den = adam_m, adam_v
    if num <= 0 or den <= 0:
        return 0.0
    return 0.5 * math.log(num / den)


class ControlState:
    """What both the controller and the simulator carry between decisions: the current clip norm and σ, and
    the public losses seen so far. :meth:`decide` maps an action through the guard."""

    def __init__(self, mapper: ActionMapper, guard: BudgetGuard) -> None:
        self.mapper = mapper
        self.guard = guard
        self.clip = mapper.base_clip
        self.sigma = mapper.base_sigma
        self.losses: list[float] = []

    @property
    def initial_loss(self) -> float:
        return self.losses[0]

    def observe(
        self,
        loss: float,
        *,
        progress: float,
        epsilon_ratio: float,
        cosine: float,
        log_optimizer_ratio: float,
        count_fractions: Floats = (),
    ) -> np.ndarray:
        """Record this decision's public loss and return the observation."""
        self.losses.append(float(loss))
        return build_observation(
            progress,
            self.losses,
            self.initial_loss,
            math.log(self.clip / self.mapper.base_clip),
            epsilon_ratio,
            cosine,
            log_optimizer_ratio,
            count_fractions,
        )

    def last_reward(self) -> float:
        return reward(self.losses[-2], self.losses[-1], self.initial_loss)

    def decide(self, action: np.ndarray, interval: int) -> tuple[float, dict[str, float]] | None:
        """(σ, thresholds) for the next ``interval`` steps, or ``None`` when no σ ≤ σ_max keeps the budget.
        σ is used as proposed when it passes the guard exactly (so action 0 is σ0 itself); otherwise it is
        raised onto the guard's grid."""
        action = self.mapper.check(action)
        proposed = self.mapper.sigma(action[1])
        sigma = (
            proposed if self.guard.passes(proposed, interval) else self.guard.safe_sigma(proposed, interval)
        )
        if sigma is None:
            return None
        self.clip = self.mapper.next_clip(self.clip, action[0])
        self.sigma = sigma
        return sigma, self.mapper.thresholds(self.clip, action[2:])

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "sigma": self.sigma, "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip, self.sigma, self.losses = state["clip"], state["sigma"], list(state["losses"])
