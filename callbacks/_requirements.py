"""Checks the σ/threshold controllers share: what a strategy must offer before a controller may drive it.

:class:`~dplightning.callbacks._controller.StrategyController` runs the ones a controller declares, once, at
``setup("fit")``.
"""

from __future__ import annotations

from typing import Any

from dplightning.errors import DPLightningError
from dplightning.strategies.dpsgd import DPSGDMixin
from dplightning.strategies.dpzo import DPZOStrategy
from dplightning.strategies.protocol import PrivateStrategy


def require_private(strategy: Any, callback: str) -> None:
    """Refuse a strategy that does not offer the private-strategy contract (budget, accountant, σ setters)."""
    if not isinstance(strategy, PrivateStrategy):
        raise DPLightningError(
            f"{callback} drives DPSGDStrategy's σ, got {type(strategy).__name__}; set trainer.strategy to it"
        )


def require_dpsgd(strategy: Any, callback: str) -> None:
    """Refuse anything but DP-SGD (per-example gradients, clip thresholds, a noised gradient sum).

    DP-ZO releases one clipped scalar per direction: per-example gradient norms do not exist there, so a
    clip-count release would be pure noise, per-example normalisation would be ignored and threshold updates
    would act on the scalar's clip. The check is by class, not by attributes: a strategy with DP-SGD's attributes
    says nothing about what it releases. DP-ZO is named first for a message that says why.
    """
    if isinstance(strategy, DPZOStrategy):
        raise DPLightningError(
            f"{callback} adapts DP-SGD's per-example gradient clipping, but DPZOStrategy releases one "
            "clipped scalar per step and has no per-example gradients; drop the callback or use DPSGDStrategy"
        )
    if not isinstance(strategy, DPSGDMixin):
        raise DPLightningError(
            f"{callback} drives DPSGDStrategy (per-example gradients), got {type(strategy).__name__}; "
            "set trainer.strategy to DPSGDStrategy"
        )


def require_gaussian_noise(strategy: PrivateStrategy, callback: str) -> None:
    """Refuse LMO (non-Gaussian) gradient noise: the controllers calibrate σ and add their own releases with
    Gaussian accounting, which does not describe an LMO step."""
    noise = strategy.noise
    if noise != "gaussian":
        raise DPLightningError(
            f"{callback} calibrates Gaussian noise, but the strategy uses noise='{noise}'; "
            "set trainer.strategy.init_args.noise to 'gaussian' or drop the callback"
        )


def require_single_device(strategy: Any, callback: str) -> None:
    """Refuse DDP: each rank would see only its shard's clip statistics, and per-rank decisions would diverge."""
    if getattr(strategy, "world_size", 1) > 1:  # Lightning's single-device strategies have no world_size
        raise DPLightningError(f"{callback} supports single-device DPSGDStrategy only; run it without DDP")
