"""`StrategyController`: the base of the callbacks that steer a private strategy's noise or clipping."""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from dplightning.callbacks._requirements import (
    require_dpsgd,
    require_gaussian_noise,
    require_private,
    require_single_device,
)
from dplightning.strategies.protocol import PrivateStrategy

StrategyT = TypeVar("StrategyT", bound=PrivateStrategy)


class StrategyController(Callback, Generic[StrategyT]):
    """A callback that drives the trainer's private strategy during ``fit`` through the
    :class:`~dplightning.strategies.protocol.PrivateStrategy` contract.

    A subclass declares what it needs of the strategy in the class attributes below; ``setup("fit")`` checks
    them once, in this order (DP-SGD or any private strategy, single device, Gaussian noise), then calls
    :meth:`attach` for the subclass's own checks and preparation, and only then keeps the strategy in
    :attr:`strategy`. Other stages leave the callback idle.
    """

    #: Only DP-SGD (per-example gradients); otherwise any private strategy.
    requires_dpsgd: ClassVar[bool] = True
    #: No DDP: decisions made from one rank's statistics would diverge across ranks.
    requires_single_device: ClassVar[bool] = False
    #: Gaussian gradient noise: the controller calibrates σ or adds releases with Gaussian accounting.
    requires_gaussian_noise: ClassVar[bool] = False

    def __init__(self) -> None:
        self.strategy: StrategyT | None = None
        self._last_step = -1  # the accountant's step count when a release was last handled

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check_strategy(trainer.strategy)
        strategy = cast(StrategyT, trainer.strategy)  # what check_strategy just verified
        self.attach(trainer, pl_module, strategy)
        self.strategy = strategy

    def check_strategy(self, strategy: Any) -> None:
        """Refuse ``strategy`` unless it meets every declared requirement (errors name this callback)."""
        name = type(self).__name__
        if self.requires_dpsgd:
            require_dpsgd(strategy, name)
        else:
            require_private(strategy, name)
        if self.requires_single_device:
            require_single_device(strategy, name)
        if self.requires_gaussian_noise:
            require_gaussian_noise(strategy, name)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.strategy is not None:
            self.on_batch_start(trainer, self.strategy)

    def on_batch_start(self, trainer: pl.Trainer, strategy: StrategyT) -> None:
        """Called before every (micro-)batch of ``fit``, once the strategy is attached. The strategy's own
        ``on_train_start`` runs after the callbacks', so σ is calibrated from the first batch on, not before."""

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        strategy = self.strategy
        if strategy is None:
            return
        step = strategy.accountant.steps
        if step == self._last_step:  # inside gradient accumulation, or a refused step: nothing was released
            return
        self._last_step = step
        self.on_step_released(trainer, strategy, step)

    def on_step_released(self, trainer: pl.Trainer, strategy: StrategyT, step: int) -> None:
        """Called once per released step (after its last micro-batch), with the accountant's step count; the
        module is ``trainer.lightning_module``."""

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, strategy: StrategyT) -> None:
        """Called by ``setup("fit")`` once ``strategy`` meets the requirements: the subclass's own checks (raise to
        refuse the run) and any change to the strategy that lasts for the fit."""
