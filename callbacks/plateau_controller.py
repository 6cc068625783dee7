"""`PlateauController`: the plateau rule — lower the learning rate when the loss on public data stops improving.

The non-RL baseline for :class:`~dplightning.callbacks.RLDPController`. Every ``interval`` optimizer steps the
model's loss is evaluated on a fixed set of examples of the data module's *public* split; when it has not
improved by at least ``min_delta`` (relative) for ``patience`` evaluations in a row, the learning rate of every
optimizer param group is multiplied by ``factor``, never below ``min_lr`` (and never raised).

Privacy: the decisions read the released (already privatised) weights and public data only, so they are
post-processing of the private mechanism and cost no privacy: the controller never touches σ, the clip
thresholds or the accountant, and a run spends exactly the ε it would spend without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from dplightning.callbacks._controller import StrategyController
from dplightning.errors import DPLightningError
from dplightning.strategies.protocol import PrivateStrategy


class PlateauController(StrategyController[PrivateStrategy]):
    """Reduce-on-plateau learning rate driven by the public-split loss (any private strategy; no privacy cost).

    Args:
        interval: optimizer steps between evaluations of the public loss.
        patience: evaluations in a row without improvement before the learning rate is lowered.
        factor: multiplier of the learning rate at each reduction, in (0, 1).
        min_delta: relative improvement that counts: a loss improves on the best one if it is below
            ``best·(1 − min_delta)``.
        min_lr: floor of every param group's learning rate (a group that starts below it is left alone).
        public_batches: the fixed evaluation set holds ``public_batches × eval_batch_size`` public examples
            (or the whole public split, if smaller).
        seed: seed of the choice of the fixed public examples.
    """

    # The decisions only rescale the optimizer's learning rate, which DP-ZO reads too, and add no release;
    # under DDP every rank would decide on its own, and a tie broken differently would split the ranks' rates.
    requires_dpsgd = False
    requires_single_device = True
    requires_gaussian_noise = False

    def __init__(
        self,
        *,
        interval: int = 10,
        patience: int = 3,
        factor: float = 0.5,
        min_delta: float = 0.01,
        min_lr: float = 0.0,
        public_batches: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_arguments(interval, patience, factor, min_delta, min_lr, public_batches)
        self.interval = interval
        self.patience = patience
        self.factor = float(factor)
        self.min_delta = float(min_delta)
        self.min_lr = float(min_lr)
        self.public_batches = public_batches
        self.seed = seed

        # Decision state (saved in checkpoints).
        self.best_loss = float("inf")
        self.bad_evaluations = 0  # evaluations in a row without a `min_delta` improvement
        self.lr_scale = 1.0  # product of the reductions applied so far
        self.base_lrs: list[list[float]] | None = None  # per optimizer, per param group, before any reduction
        self.public_indices: list[int] | None = None  # the fixed examples of the public split
        self.reductions = 0

        self._public_loader: DataLoader | None = None
        self._fixed_batches: list[Any] | None = None

    # ------------------------------------------------------------------------------------------ setup
    @override
    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, strategy: PrivateStrategy) -> None:
        if not hasattr(pl_module, "per_example_loss"):
            raise DPLightningError(
                "PlateauController needs a module with per_example_loss(batch) (e.g. DPLoRAModule)"
            )
        datamodule = getattr(trainer, "datamodule", None)  # set by Lightning on fit, not declared on Trainer
        if datamodule is None or not hasattr(datamodule, "public_dataloader"):
            raise DPLightningError(
                "PlateauController needs a data module with a public split; use TextDataModule"
            )
        try:
            self._public_loader = datamodule.public_dataloader()
        except DPLightningError as exc:
            raise DPLightningError(
                "PlateauController decides on data declared public; set data.public_fraction > 0"
            ) from exc

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in attach: a resumed run's state and optimizers are restored only after the callbacks' setup.
        if self.strategy is None:
            return
        if trainer.lr_scheduler_configs:
            raise DPLightningError(
                "PlateauController sets the learning rate itself and would fight the module's learning-rate "
                "scheduler; set model.lr_schedule: constant (or drop the scheduler)"
            )
        if self.base_lrs is None:
            self.base_lrs = [[float(g["lr"]) for g in opt.param_groups] for opt in trainer.optimizers]
        self._apply_lr(trainer)
        self._fixed_batches = self._build_fixed_batches(trainer)

    def _build_fixed_batches(self, trainer: pl.Trainer) -> list[Any]:
        """The fixed evaluation batches, on the module's device. A seeded random choice rather than the first
        examples: the public split is in source order, so its first notes all come from the start of the source
        (unrepresentative of a time-ordered file)."""
        loader = self._public_loader
        assert loader is not None
        dataset = loader.dataset
        size = len(dataset)  # type: ignore[arg-type]
        batch_size = loader.batch_size or 1
        if self.public_indices is None:
            count = min(size, self.public_batches * batch_size)
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed))
            self.public_indices = sorted(order[:count].tolist())
        elif max(self.public_indices) >= size:
            raise DPLightningError(
                f"PlateauController's saved public examples go up to index {max(self.public_indices)}, but the "
                f"public split has {size}; resume with the data settings of the checkpointed run"
            )
        fixed = DataLoader(
            Subset(dataset, self.public_indices), batch_size=batch_size, collate_fn=loader.collate_fn
        )
        return [trainer.strategy.batch_to_device(batch) for batch in fixed]

    # ----------------------------------------------------------------------------------------- loop
    @override
    def on_step_released(self, trainer: pl.Trainer, strategy: PrivateStrategy, step: int) -> None:
        if step % self.interval != 0:
            return
        loss = self.public_loss(trainer.lightning_module)
        if self.record(loss):
            self.reduce_lr(trainer)
        if trainer.logger is not None:
            metrics = {"controller/public_loss": loss, "controller/lr": self.current_lr(trainer)}
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def public_loss(self, pl_module: pl.LightningModule) -> float:
        """Mean per-example loss over the fixed public examples (public data: free to compute and log)."""
        assert self._fixed_batches is not None, "on_train_start builds the fixed public batches"
        per_example_loss: Callable[[Any], torch.Tensor] = pl_module.per_example_loss  # type: ignore[assignment]
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), pl_module.trainer.precision_plugin.forward_context():
                losses = [per_example_loss(batch).float() for batch in self._fixed_batches]
        finally:
            pl_module.train(was_training)
        return float(torch.cat(losses).mean())

    def record(self, loss: float) -> bool:
        """Take one evaluation into the plateau rule; True when the learning rate should be lowered now.

        A non-finite loss never counts as an improvement.
        """
        if loss < self.best_loss * (1.0 - self.min_delta):
            self.best_loss = loss
            self.bad_evaluations = 0
            return False
        self.bad_evaluations += 1
        if self.bad_evaluations < self.patience:
            return False
        self.bad_evaluations = 0  # patience restarts after a reduction
        return True

    def reduce_lr(self, trainer: pl.Trainer) -> bool:
        """Multiply the learning-rate scale by ``factor`` unless every group already sits at its floor; returns
        whether any rate changed."""
        assert self.base_lrs is not None
        if all(base * self.lr_scale <= self._floor(base) for bases in self.base_lrs for base in bases):
            return False
        self.lr_scale *= self.factor
        self.reductions += 1
        self._apply_lr(trainer)
        rank_zero_info(f"[dplightning] plateau: public loss stalled; learning rate × {self.lr_scale:g}")
        return True

    def _floor(self, base: float) -> float:
        return min(base, self.min_lr)  # a group configured below min_lr is never raised to it

    def _apply_lr(self, trainer: pl.Trainer) -> None:
        """Set every group's rate from its base and the scale, so a resumed run reproduces it exactly."""
        assert self.base_lrs is not None
        if len(self.base_lrs) != len(trainer.optimizers) or any(
            len(bases) != len(opt.param_groups) for bases, opt in zip(self.base_lrs, trainer.optimizers)
        ):
            raise DPLightningError(
                "PlateauController's saved learning rates do not match the optimizers' param groups; resume "
                "with the model settings of the checkpointed run"
            )
        for bases, optimizer in zip(self.base_lrs, trainer.optimizers):
            for base, group in zip(bases, optimizer.param_groups):
                group["lr"] = max(base * self.lr_scale, self._floor(base))

    @staticmethod
    def current_lr(trainer: pl.Trainer) -> float:
        """The first optimizer's first param group's learning rate (what is logged)."""
        return float(trainer.optimizers[0].param_groups[0]["lr"])

    # ---------------------------------------------------------------------------------- persistence
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_loss": self.best_loss,
            "bad_evaluations": self.bad_evaluations,
            "lr_scale": self.lr_scale,
            "base_lrs": self.base_lrs,
            "public_indices": self.public_indices,
            "reductions": self.reductions,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_loss = float(state_dict["best_loss"])
        self.bad_evaluations = int(state_dict["bad_evaluations"])
        self.lr_scale = float(state_dict["lr_scale"])
        self.base_lrs = state_dict["base_lrs"]
        self.public_indices = state_dict["public_indices"]
        self.reductions = int(state_dict["reductions"])


def _check_arguments(
    interval: int, patience: int, factor: float, min_delta: float, min_lr: float, public_batches: int
) -> None:
    """Refuse bad settings with one message naming the argument and the fix."""
    problems = [
        (interval < 1, f"interval must be >= 1 optimizer step, got {interval}; e.g. 10"),
        (patience < 1, f"patience must be >= 1 evaluation, got {patience}; e.g. 3"),
        (
            not 0.0 < factor < 1.0,
            f"factor must be in (0, 1), got {factor}; e.g. 0.5 halves the learning rate",
        ),
        (not 0.0 <= min_delta < 1.0, f"min_delta must be in [0, 1), got {min_delta}; e.g. 0.01 (1 % better)"),
        (not min_lr >= 0.0, f"min_lr must be >= 0, got {min_lr}; e.g. 1e-5, or 0 for no floor"),
        (public_batches < 1, f"public_batches must be >= 1, got {public_batches}; e.g. 4"),
    ]
    for bad, message in problems:
        if bad:
            raise DPLightningError(f"PlateauController: {message}")
