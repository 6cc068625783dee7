"""`QuantileClipping`: adaptive clip thresholds that track a target quantile of per-example gradient norms.

Andrew, Thakkar, McMahan & Ramaswamy, "Differentially Private Learning with Adaptive Clipping" (NeurIPS 2021).
Every optimizer step, per clipping group g, the fraction of examples whose norm was *not* clipped is released
with Gaussian noise and the threshold moves geometrically towards the target quantile γ::

    b̃_g = (Σ_i (1[||g_i|| ≤ C_g] − ½) + N(0, σ_b²)) / m + ½          (m = expected batch size)
    C_g ← C_g · exp(−η · (b̃_g − γ))

Privacy: the centred count has L2 sensitivity ½ per group, so it is a Gaussian release of multiplier 2σ_b
(√k/2 and σ_count·√k/2 for k groups). It is registered as an auxiliary channel of the strategy and the gradient
noise is raised so that the combined step costs exactly the budgeted σ:
``σ_grad = (σ^-2 − (2σ_b)^-2)^-1/2``. The split and the release are :func:`split_sigma` and
:class:`ClipCountRelease`, shared with the RLDP controller.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from dplightning.callbacks._controller import StrategyController
from dplightning.errors import DPLightningError
from dplightning.privacy.count_release import (
    ClipCountRelease,
    count_noise_seed,
    count_noise_source,
    count_noise_state,
    split_sigma,
)
from dplightning.strategies.base import short_group_name
from dplightning.strategies.protocol import PerExampleClippingStrategy

COUNT_CHANNEL = "quantile_clip_counts"


class QuantileClipping(StrategyController[PerExampleClippingStrategy]):
    """Adaptive per-group clipping to a target quantile of the per-example norms (use with ``DPSGDStrategy``).

    Args:
        target_quantile: γ in (0, 1): the fraction of examples that should be left unclipped (0.5 = median).
        learning_rate: η of the geometric update ``C ← C·exp(−η(b̃ − γ))``.
        count_noise_std: σ_b, the noise std on each centred count (in examples). ``None`` derives it from
            ``count_budget_fraction``. Andrew et al. suggest σ_b ≈ m/20 (noise 0.05 on the fraction).
        count_budget_fraction: share of each step's privacy (in σ^-2 units) spent on the counts when
            ``count_noise_std`` is ``None``.
        min_threshold, max_threshold: bounds on every C_g (keeps the noise scale sane).
        seed: seed of the count noise, which must stay as secret as the strategy's; ``None`` (default) derives it
            from the strategy's ``seed``. With the strategy's ``secure_rng`` the noise comes from the OS CSPRNG.
    """

    # On DP-ZO the counts would be pure noise; per-rank counts would diverge under DDP; the count release is
    # accounted as a Gaussian channel of the step.
    requires_dpsgd = True
    requires_single_device = True
    requires_gaussian_noise = True

    def __init__(
        self,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        count_noise_std: float | None = None,
        count_budget_fraction: float = 0.05,
        min_threshold: float = 1e-4,
        max_threshold: float = 1e4,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < target_quantile < 1.0:
            raise DPLightningError(
                f"target_quantile must be in (0, 1), got {target_quantile}; e.g. 0.5 for the median"
            )
        if learning_rate <= 0:
            raise DPLightningError(f"learning_rate must be > 0, got {learning_rate}; Andrew et al. use 0.2")
        if count_noise_std is not None and count_noise_std <= 0:
            raise DPLightningError(
                f"count_noise_std must be > 0, got {count_noise_std}; e.g. batch size / 20"
            )
        if not 0.0 < count_budget_fraction < 1.0:
            raise DPLightningError(f"count_budget_fraction must be in (0, 1), got {count_budget_fraction}")
        if not 0 < min_threshold < max_threshold:
            raise DPLightningError("need 0 < min_threshold < max_threshold")
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_noise_std = count_noise_std
        self.count_budget_fraction = float(count_budget_fraction)
        self.min_threshold = float(min_threshold)
        self.max_threshold = float(max_threshold)
        self.seed = seed
        self.release: ClipCountRelease | None = None
        self.sigma: float | None = None  # budgeted σ of one step (gradient + counts together)
        self.sigma_grad = 0.0
        self.sigma_count = 0.0  # multiplier of the count channel relative to its sensitivity (= 2σ_b)
        self.last_unclipped_fraction: dict[str, float] = {}
        self._last_step = -1
        self._noise_state: dict[str, Any] | None = None  # count-noise stream saved by the run being resumed

    # ------------------------------------------------------------------------------------------ setup
    def initialise(self, strategy: PerExampleClippingStrategy) -> None:
        """Split the strategy's (calibrated) σ between gradient and counts; build the count release."""
        self.strategy = strategy
        if self.sigma is None:  # a resumed run restores σ from the checkpoint instead
            self.sigma = float(strategy.effective_noise_multiplier)
        self._apply_split()
        groups = [[g] for g in strategy.group_names]
        # A resumed run continues the saved stream: re-seeding would draw steps 1…k's noise again.
        steps_done = max(self._last_step, 0)
        # hashed even when given: the raw seed would replay the gradient noise's stream if it equalled the strategy's
        seed = count_noise_seed(strategy.seed if self.seed is None else self.seed, "quantile_clipping")
        noise = count_noise_source(seed, strategy.secure_rng, self._noise_state, steps_done)
        if strategy.expected_batch_size is None:
            raise DPLightningError(
                "QuantileClipping found no expected batch size: the strategy did not see a torch DataLoader for "
                "training"
            )
        self.release = ClipCountRelease(groups, strategy.expected_batch_size, noise, centered=True)

    def count_fraction(self, sigma: float, num_groups: int) -> float:
        """Share of the step's σ^-2 spent on the counts. With σ_b per count and k counts, the centred count vector
        (sensitivity √k/2) is released at multiplier σ_count = 2σ_b/√k, so the share is ``k·σ²/(2σ_b)²``."""
        if self.count_noise_std is None:
            return self.count_budget_fraction
        fraction = num_groups * sigma**2 / (2.0 * self.count_noise_std) ** 2
        if fraction >= 1.0:
            raise DPLightningError(
                f"count_noise_std={self.count_noise_std} costs more than the whole step at σ={sigma:.4g} with "
                f"{num_groups} groups (needs 2·σ_b > σ·√k); raise count_noise_std above "
                f"{sigma * math.sqrt(num_groups) / 2:.4g} or use count_budget_fraction"
            )
        return fraction

    def _apply_split(self) -> None:
        assert self.sigma is not None and self.strategy is not None
        strategy = self.strategy
        if self.sigma <= 0:  # non-private run (σ = 0): counts are exact, ε = ∞ anyway
            self.sigma_grad = self.sigma_count = 0.0
        else:
            fraction = self.count_fraction(self.sigma, len(strategy.group_names))
            self.sigma_grad, self.sigma_count = split_sigma(self.sigma, fraction)
        strategy.set_noise_multiplier(self.sigma_grad)
        strategy.auxiliary_noise_multipliers[COUNT_CHANNEL] = self.sigma_count

    @property
    def count_noise_std_per_count(self) -> float:
        """σ_b actually used: noise std on each centred count (in examples)."""
        assert self.strategy is not None
        k = len(self.strategy.group_names)
        return self.sigma_count * math.sqrt(k) / 2.0

    # ----------------------------------------------------------------------------------------- loop
    @override
    def on_batch_start(self, trainer: pl.Trainer, strategy: PerExampleClippingStrategy) -> None:
        if self.release is None:
            self.initialise(strategy)

    @override
    def on_step_released(self, trainer: pl.Trainer, strategy: PerExampleClippingStrategy, step: int) -> None:
        self.update(strategy.private_step_norms)
        strategy.private_step_norms = {}
        if trainer.logger is not None:
            metrics = {
                f"quantile_clip/unclipped_fraction/{short_group_name(g)}": f
                for g, f in self.last_unclipped_fraction.items()
            }
            metrics["quantile_clip/total_clip_norm"] = strategy.total_clip_norm
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def update(self, norms: dict[str, torch.Tensor]) -> dict[str, float]:
        """One privatised quantile step from this step's per-example norms ``{group: [B]}`` (paid for by the
        count channel in this step's σ_eff). Returns the new thresholds."""
        assert self.release is not None and self.strategy is not None
        strategy = self.strategy
        groups = strategy.group_names
        clipped = self.release.release(
            norms, strategy.clip_thresholds, self.sigma_count
        )  # noisy clipped fraction
        new: dict[str, float] = {}
        for g, c_frac in zip(groups, clipped):
            unclipped = 1.0 - float(c_frac)
            self.last_unclipped_fraction[g] = unclipped
            c = strategy.clip_thresholds[g] * math.exp(
                -self.learning_rate * (unclipped - self.target_quantile)
            )
            new[g] = min(max(c, self.min_threshold), self.max_threshold)
        # Thresholds move, per-group σ_g stay: re-apply the split so every group's noise is σ_grad·C_total again.
        strategy.set_clip_thresholds(new)
        strategy.set_noise_multiplier(self.sigma_grad)
        return new

    # ---------------------------------------------------------------------------------- persistence
    @override
    def state_dict(self) -> dict[str, Any]:
        # Before the first batch (e.g. saved right after a resume) the loaded stream is passed on unchanged.
        noise = count_noise_state(self.release.noise) if self.release is not None else self._noise_state
        return {"sigma": self.sigma, "last_step": self._last_step, "count_noise": noise}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sigma = state_dict.get("sigma")
        self._last_step = state_dict.get("last_step", -1)
        self._noise_state = state_dict.get("count_noise")
        # Checkpoints of earlier versions kept the bare generator state.
        if self._noise_state is None and state_dict.get("generator") is not None:
            self._noise_state = {"secure": False, "generator": state_dict["generator"]}
