"""PlateauController: the learning rate is lowered exactly when the public loss stalls, never below min_lr and
never raised; it costs no privacy; a resumed run continues its decisions; bad settings are refused."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import StopAfter
from lightning.pytorch.loggers import Logger

from dplightning.callbacks import PlateauController
from dplightning.data import TextDataModule
from dplightning.errors import DPLightningError
from dplightning.module import DPLoRAModule
from dplightning.strategies import DPSGDStrategy, DPZOStrategy

BASE_LR = 0.01


# ---------------------------------------------------------------------------------------------- helpers
def _parts(lr_schedule: str = "constant") -> tuple[DPLoRAModule, TextDataModule]:
    model = DPLoRAModule(
        model_name="tiny-llama",
        lora_rank=2,
        learning_rate=BASE_LR,
        optimizer="sgd",
        momentum=0.9,
        lr_schedule=lr_schedule,  # type: ignore[arg-type]
        seed=0,
    )
    data = TextDataModule(
        tokenizer="tiny-llama",
        num_records=160,
        max_length=16,
        batch_size=8,
        eval_batch_size=4,
        public_fraction=0.1,
    )
    return model, data


def _strategy(kind: str = "dpsgd") -> DPSGDStrategy | DPZOStrategy:
    settings: dict[str, Any] = {
        "target_epsilon": 8.0,
        "target_delta": 1e-4,
        "accountant": "rdp",
        "device": "cpu",
        "seed": 0,
    }
    return DPSGDStrategy(clipping="flat", **settings) if kind == "dpsgd" else DPZOStrategy(**settings)


class LrPerStep(pl.Callback):
    """The learning rate each optimizer step used."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))


def _fit(
    callbacks: list[pl.Callback],
    max_steps: int,
    *,
    strategy: DPSGDStrategy | DPZOStrategy | None = None,
    lr_schedule: str = "constant",
    logger: Logger | bool = False,
    ckpt_path: str | None = None,
) -> tuple[pl.Trainer, DPSGDStrategy | DPZOStrategy]:
    strategy = strategy if strategy is not None else _strategy()
    model, data = _parts(lr_schedule)
    trainer = pl.Trainer(
        max_steps=max_steps,
        strategy=strategy,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, strategy


def _script(controller: PlateauController, loss_at_step: dict[int, float]) -> None:
    """Replace the controller's public loss with a fixed value per optimizer step."""

    def scripted(pl_module: pl.LightningModule) -> float:
        assert controller.strategy is not None
        return loss_at_step[controller.strategy.accountant.steps]

    controller.public_loss = scripted  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------- the rule
def test_record_counts_only_relative_improvements_of_min_delta() -> None:
    controller = PlateauController(patience=2, min_delta=0.1)
    # 9.5 beats 10 but not by 10 %; 8.0 does and resets the count; NaN never improves; 7.1 beats 8 by > 10 %.
    decisions = [controller.record(x) for x in (10.0, 9.5, 9.2, 8.0, 7.5, math.nan, 7.1, 7.0)]
    assert decisions == [False, False, True, False, False, True, False, False]
    assert controller.best_loss == 7.1 and controller.bad_evaluations == 1


def test_lr_is_halved_exactly_when_the_public_loss_stalls() -> None:
    controller = PlateauController(interval=2, patience=2, min_delta=0.1, factor=0.5)
    # evaluations at steps 2, 4, ..., 12: best 10 → stall, stall (halve after step 6) → best 8 → stall, stall
    # (halve after step 12)
    _script(controller, {2: 10.0, 4: 9.5, 6: 9.2, 8: 8.0, 10: 7.9, 12: 7.8})
    lrs = LrPerStep()
    trainer, _ = _fit([controller, lrs], max_steps=12)
    assert lrs.lrs == [BASE_LR] * 6 + [BASE_LR / 2] * 6
    assert controller.reductions == 2 and controller.lr_scale == 0.25
    assert PlateauController.current_lr(trainer) == BASE_LR / 4


def test_lr_never_goes_below_min_lr_nor_up() -> None:
    controller = PlateauController(factor=0.5, min_lr=0.003)
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    # the second group starts below min_lr: the floor must not raise it
    optimizer = torch.optim.SGD([{"params": [p], "lr": 0.01}, {"params": [q], "lr": 0.001}])
    trainer = SimpleNamespace(optimizers=[optimizer])
    controller.base_lrs = [[0.01, 0.001]]
    history = []
    changed = []
    for _ in range(6):
        changed.append(controller.reduce_lr(trainer))  # type: ignore[arg-type]
        history.append([g["lr"] for g in optimizer.param_groups])
    assert history[:3] == [[0.005, 0.001], [0.003, 0.001], [0.003, 0.001]]
    assert changed == [True, True, False, False, False, False]  # at the floor the scale stops shrinking
    assert controller.lr_scale == 0.25
    assert all(a >= b for before, after in itertools.pairwise(history) for a, b in zip(before, after))


# ------------------------------------------------------------------------------------------ real fit
def test_real_fit_logs_the_public_loss_on_a_fixed_set() -> None:
    controller = PlateauController(interval=2, patience=1, min_delta=0.5, public_batches=2)
    logger = RecordingLogger()
    trainer, _ = _fit([controller], max_steps=6, logger=logger)
    logged = [(step, m) for step, m in logger.logged if "controller/public_loss" in m]
    assert [step for step, _ in logged] == [2, 4, 6]
    assert all(math.isfinite(m["controller/public_loss"]) for _, m in logged)
    # min_delta 0.5 is never met after the first evaluation: halved after steps 4 and 6
    assert [m["controller/lr"] for _, m in logged] == [BASE_LR, BASE_LR / 2, BASE_LR / 4]
    # a fixed set: eval_batch_size 4 × 2 batches of the 16 public notes, the same loss when evaluated again
    assert controller.public_indices is not None and len(controller.public_indices) == 8
    module = trainer.lightning_module
    assert controller.public_loss(module) == controller.public_loss(module)
    assert module.training


@pytest.mark.parametrize("kind", ["dpsgd", "dpzo"])
def test_controller_spends_exactly_the_epsilon_of_a_run_without_it(kind: str) -> None:
    controller = PlateauController(interval=1, patience=1, min_delta=0.5)
    trainer, with_controller = _fit([controller], max_steps=5, strategy=_strategy(kind))
    _, without = _fit([], max_steps=5, strategy=_strategy(kind))
    assert controller.reductions >= 3 and PlateauController.current_lr(trainer) < BASE_LR / 4
    assert with_controller.accountant.steps == without.accountant.steps == 5
    assert with_controller.effective_noise_multiplier == without.effective_noise_multiplier
    assert with_controller.epsilon() == without.epsilon()
    assert not with_controller.auxiliary_noise_multipliers


# --------------------------------------------------------------------------------------------- resume
def test_resumed_run_continues_the_decisions(tmp_path: Path) -> None:
    # A loss that never improves after step 1: with patience 2 the rate halves after steps 3 and 5. The
    # checkpoint at step 4 sits between them, so a resume that lost the count or the scale would differ.
    losses = dict.fromkeys(range(1, 7), 10.0)
    full = PlateauController(interval=1, patience=2, public_batches=2)
    _script(full, losses)
    full_lrs = LrPerStep()
    full_trainer, _ = _fit([full, full_lrs], max_steps=6)
    assert full_lrs.lrs == [BASE_LR] * 3 + [BASE_LR / 2] * 2 + [BASE_LR / 4]
    # The same run interrupted after step 4 (a resume from an older checkpoint of a longer run is refused:
    # its seeded noise would be replayed on other batches).
    partial = PlateauController(interval=1, patience=2, public_batches=2)
    _script(partial, losses)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    _fit([partial, StopAfter(4), checkpoint], max_steps=6)

    resumed = PlateauController(
        interval=1, patience=2, public_batches=2, seed=1
    )  # indices must come from the file
    _script(resumed, losses)
    resumed_lrs = LrPerStep()
    resumed_trainer, _ = _fit(
        [resumed, resumed_lrs], max_steps=6, ckpt_path=str(next(tmp_path.glob("*step=4.ckpt")))
    )
    assert resumed_lrs.lrs == full_lrs.lrs[4:]
    assert resumed.state_dict() == full.state_dict()
    assert PlateauController.current_lr(resumed_trainer) == PlateauController.current_lr(full_trainer)


def test_state_round_trips() -> None:
    original = PlateauController()
    original.best_loss, original.bad_evaluations, original.lr_scale = 3.5, 2, 0.25
    original.base_lrs, original.public_indices, original.reductions = [[0.01]], [3, 1, 4], 2
    copy = PlateauController(seed=5)
    copy.load_state_dict(original.state_dict())
    assert copy.state_dict() == original.state_dict()


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"interval": 0}, "interval"),
        ({"patience": 0}, "patience"),
        ({"factor": 1.0}, "factor"),
        ({"factor": 0.0}, "factor"),
        ({"min_delta": -0.1}, "min_delta"),
        ({"min_delta": 1.0}, "min_delta"),
        ({"min_lr": -1e-5}, "min_lr"),
        ({"min_lr": math.nan}, "min_lr"),
        ({"public_batches": 0}, "public_batches"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(DPLightningError, match=rf"^PlateauController: {argument} must be .*; e\.g\. "):
        PlateauController(**kwargs)


def test_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        PlateauController(10)  # type: ignore[misc]


def test_requirements_and_refusals_at_setup() -> None:
    assert (
        PlateauController.requires_dpsgd,
        PlateauController.requires_single_device,
        PlateauController.requires_gaussian_noise,
    ) == (False, True, False)
    no_public = TextDataModule(tokenizer="tiny-llama", num_records=40, public_fraction=0.0)
    trainer = SimpleNamespace(strategy=_strategy(), callbacks=[], datamodule=no_public)
    module = SimpleNamespace(per_example_loss=lambda batch: batch)
    with pytest.raises(DPLightningError, match="public_fraction > 0"):
        PlateauController().setup(trainer, module, "fit")  # type: ignore[arg-type]


def test_a_learning_rate_schedule_is_refused() -> None:
    with pytest.raises(DPLightningError, match="lr_schedule: constant"):
        _fit([PlateauController()], max_steps=2, lr_schedule="linear")
