"""Checks the σ/threshold controllers share: what a strategy must offer before a controller may drive it."""

from __future__ import annotations

from typing import Any

from dplightning.errors import DPLightningError


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
