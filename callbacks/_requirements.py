"""Checks the σ/threshold controllers share: what a strategy must offer before a controller may drive it."""

from __future__ import annotations

from typing import Any

from dplightning.errors import DPLightningError
from dplightning.strategies.dpsgd import DPSGDMixin
from dplightning.strategies.dpzo import DPZOStrategy


def require_dpsgd(strategy: Any, callback: str) -> None:
    """Refuse anything but DP-SGD (per-example gradients, clip thresholds, a noised gradient sum).

    DP-ZO releases one clipped scalar per direction: per-example gradient norms do not exist there, so a
    clip-count release would be pure noise, per-example normalisation would be ignored and threshold updates
    would act on the scalar's clip. DP-ZO is refused by class first because ``DPZOStrategy`` subclasses
    ``DPSGDStrategy`` today; the positive DP-SGD check keeps refusing it (and look-alikes) if that changes.
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


def require_gaussian_noise(strategy: Any, callback: str) -> None:
    """Refuse LMO (non-Gaussian) gradient noise: the controllers calibrate σ and add their own releases with
    Gaussian accounting, which does not describe an LMO step."""
    noise = getattr(strategy, "noise", "gaussian")
    if noise != "gaussian":
        raise DPLightningError(
            f"{callback} calibrates Gaussian noise, but the strategy uses noise='{noise}'; "
            "set trainer.strategy.init_args.noise to 'gaussian' or drop the callback"
        )


def require_single_device(strategy: Any, callback: str) -> None:
    """Refuse DDP: each rank would see only its shard's clip statistics, and per-rank decisions would diverge."""
    if getattr(strategy, "world_size", 1) > 1:
        raise DPLightningError(f"{callback} supports single-device DPSGDStrategy only; run it without DDP")
