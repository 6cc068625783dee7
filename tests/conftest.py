"""Shared test helpers: a quiet Trainer, a gradient recorder, and a DP-SGD strategy set up without a model.

Test modules import the plain helpers (``from conftest import quiet_trainer``); the fixtures of the same names
hand out the same factories to tests that prefer injection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from dplightning.strategies import DPSGDStrategy


def quiet_trainer(
    strategy: Any,
    callbacks: Sequence[pl.Callback] | None = None,
    max_steps: int = 3,
    checkpoints: bool = False,
    **kwargs: Any,
) -> pl.Trainer:
    """A Trainer without logger, progress bar, model summary or sanity validation (checkpoints only on request)."""
    kwargs.setdefault("enable_checkpointing", checkpoints)
    return pl.Trainer(
        strategy=strategy,
        callbacks=list(callbacks or []),
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


class GradRecorder(pl.Callback):
    """Records ``p.grad`` as the optimizer will see it (after privatisation): one ``{name: grad}`` per step, or
    with ``flat=True`` one concatenated vector per step."""

    def __init__(self, flat: bool = False) -> None:
        self.flat = flat
        self.grads: list[Any] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        named = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.grads.append(torch.cat([g.flatten() for g in named.values()]) if self.flat else named)


def fake_dpsgd_strategy(
    groups: Mapping[str, list[str]],
    thresholds: float,
    sigma: float,
    sample_rate: float,
    planned_steps: int,
    expected_batch_size: float,
    **strategy_kwargs: Any,
) -> DPSGDStrategy:
    """A DPSGDStrategy as after setup and on_train_start, without a model: for fast controller loops."""
    strategy = DPSGDStrategy(target_delta=1e-5, device="cpu", **strategy_kwargs)
    strategy.groups = dict(groups)
    strategy.clip_thresholds = dict.fromkeys(strategy.groups, thresholds)
    strategy.sample_rate, strategy.planned_steps = sample_rate, planned_steps
    strategy.expected_batch_size = expected_batch_size
    strategy.set_noise_multiplier(sigma)
    return strategy


@pytest.fixture(name="quiet_trainer")
def quiet_trainer_fixture() -> Any:
    return quiet_trainer


@pytest.fixture(name="fake_dpsgd_strategy")
def fake_dpsgd_strategy_fixture() -> Any:
    return fake_dpsgd_strategy
