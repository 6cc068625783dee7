"""Shared test helpers: a quiet Trainer, a gradient recorder, a DP-SGD strategy set up without a model, clipped
sums as floats, the installed ``dplightning`` command, and the benchmark scripts as modules.

Test modules import the plain helpers (``from conftest import quiet_trainer``); the fixtures of the same names
hand out the same factories to tests that prefer injection.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from dplightning.privacy.clipping import clip_to_grid_and_sum, group_grids
from dplightning.privacy.discretization import from_grid
from dplightning.strategies import DPSGDStrategy

ROOT = Path(__file__).resolve().parents[1]

# A valid `dplightning privacy epsilon` command that takes well under a second.
PRIVACY_EPSILON = [
    "privacy",
    "epsilon",
    "--sigma",
    "1",
    "--sample-rate",
    "0.01",
    "--steps",
    "10",
    "--delta",
    "1e-5",
]


def run_dplightning(
    args: Sequence[str], *, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``dplightning`` console script (the one next to this interpreter), capturing text."""
    exe = Path(sys.executable).parent / "dplightning"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module: the folder holds scripts, not a package. It is registered in
    ``sys.modules`` under ``name`` before it runs, as an import would (its dataclasses need that)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def clipped_sums(
    grads: Mapping[str, Tensor],
    groups: Mapping[str, Sequence[str]],
    thresholds: Mapping[str, float],
    *,
    p: float = 2.0,
    stability: float | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """What DP-SGD releases before noise, as floats: :func:`clip_to_grid_and_sum` on the grids of ``thresholds``,
    taken back from grid units (float64). Returns (``{param: clipped sum}``, ``{group: pre-clip norms [B]}``)."""
    sizes = {name: grads[name].shape[1:].numel() for names in groups.values() for name in names}
    grids = group_grids(groups, sizes, thresholds, p)
    units, norms = clip_to_grid_and_sum(grads, groups, thresholds, grids, p=p, stability=stability)
    group_of = {name: group for group, names in groups.items() for name in names}
    return {name: from_grid(u, grids[group_of[name]]) for name, u in units.items()}, norms


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


class StopAfter(pl.Callback):
    """Stops training after optimizer step ``step``, as an interrupted run: its checkpoint at that step is its
    latest, so a resume from it replays nothing (a resume from an older one is refused for seeded runs)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


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
