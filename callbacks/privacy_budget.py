"""`PrivacyBudget`: log the privacy spent every step and stop training cleanly before the budget is exceeded."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from dplightning.callbacks._controller import StrategyController
from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.strategies.base import short_group_name
from dplightning.strategies.protocol import PrivateStrategy


class PrivacyBudget(StrategyController[PrivateStrategy]):
    """Logs ``privacy/epsilon``, ``privacy/delta``, ``privacy/noise_multiplier``, ``privacy/clip_norm`` (and
    ``privacy/clip/<group>`` per group) and stops training when the next step would exceed ``target_epsilon``.

    Works with any strategy that satisfies :class:`~dplightning.strategies.protocol.PrivateStrategy`
    (``DPSGDStrategy``, ``DDPDPSGDStrategy``, ``DPZOStrategy``).
    The strategy additionally refuses any step that would exceed the budget, so the guarantee does not depend
    on this callback; the callback makes the stop graceful and visible.

    Args:
        target_epsilon: budget; ``None`` keeps the strategy's own ``target_epsilon``.
        target_delta: δ at which ε is reported. The strategy enforces its budget at its own ``target_delta``, so
            a different δ here is refused at setup (set it on the strategy instead); ``None`` takes the strategy's.
        log_every_n_steps: compute and log ε every n optimizer steps (ε queries cost a PLD composition).
        log_group_thresholds: also log each group's clip threshold.
    """

    def __init__(
        self,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        log_every_n_steps: int = 1,
        log_group_thresholds: bool = True,
    ) -> None:
        if target_epsilon is not None and target_epsilon <= 0:
            raise PrivacyBudgetError(
                f"target_epsilon must be > 0, got {target_epsilon}; pick a positive budget"
            )
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.log_group_thresholds = log_group_thresholds
        self.stopped_on_budget = False
        super().__init__()

    @property
    def delta(self) -> float:
        if self.target_delta is not None:
            return self.target_delta
        assert self.strategy is not None, "the strategy's δ is known from setup on"
        return self.strategy.target_delta

    requires_dpsgd = False  # any private strategy: DP-SGD, DDP DP-SGD, DP-ZO

    @override
    def check_strategy(self, strategy: Any) -> None:
        if not isinstance(strategy, PrivateStrategy):
            raise DPLightningError(
                f"PrivacyBudget needs a private strategy, got {type(strategy).__name__}; "
                "set Trainer(strategy=DPSGDStrategy(...)) or DPZOStrategy(...)"
            )

    @override
    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, strategy: PrivateStrategy) -> None:
        self._check_delta(strategy)
        if self.target_epsilon is not None:
            current = strategy.max_epsilon
            strategy.max_epsilon = (
                self.target_epsilon if current is None else min(current, self.target_epsilon)
            )

    def _check_delta(self, strategy: PrivateStrategy) -> None:
        # The strategy's guard and σ calibration work at its own δ. A budget reported at another δ would either
        # claim a guarantee nothing enforces (smaller δ) or stop at a reported ε below the budget (larger δ).
        if self.target_delta is None or float(self.target_delta) == float(strategy.target_delta):
            return
        raise DPLightningError(
            f"PrivacyBudget(target_delta={self.target_delta:g}) differs from the strategy's target_delta="
            f"{strategy.target_delta:g}, the δ at which the budget is enforced; set the strategy's target_delta to "
            f"{self.target_delta:g} and drop PrivacyBudget's target_delta"
        )

    @override
    def on_batch_start(self, trainer: pl.Trainer, strategy: PrivateStrategy) -> None:
        # Checked here, not at the end of the previous batch: controllers (RLDPController, QuantileClipping) set
        # the next σ in their own on_train_batch_end, which may run after this callback's. A σ changed later in
        # this same hook is still covered: the strategy re-checks at release and skips a step that would not fit.
        if strategy.within_budget(strategy.effective_noise_multiplier, strategy.sample_rate):  # type: ignore[arg-type]
            return
        self.stopped_on_budget = True
        trainer.should_stop = True
        rank_zero_info(
            f"[dplightning] stopping: one more step would exceed ε={strategy.max_epsilon} "
            f"(spent ε={strategy.accountant.epsilon(self.delta):.4f} after {strategy.accountant.steps} steps)"
        )

    @override
    def on_step_released(self, trainer: pl.Trainer, strategy: PrivateStrategy, step: int) -> None:
        pl_module = trainer.lightning_module
        if step % self.log_every_n_steps == 0 or trainer.should_stop:
            metrics = {
                "privacy/epsilon": strategy.accountant.epsilon(self.delta),
                "privacy/delta": self.delta,
                "privacy/noise_multiplier": strategy.effective_noise_multiplier,
                "privacy/clip_norm": strategy.total_clip_norm,
            }
            if strategy.sample_rate is not None:  # set once the training dataloader is processed
                metrics["privacy/sample_rate"] = strategy.sample_rate
            if self.log_group_thresholds and len(strategy.clip_thresholds) > 1:
                for group, c in strategy.clip_thresholds.items():
                    metrics[f"privacy/clip/{short_group_name(group)}"] = c
            pl_module.log("privacy/epsilon", metrics.pop("privacy/epsilon"), prog_bar=True)
            pl_module.log_dict(metrics)

    # The accountant is checkpointed by the strategy alone (checkpoint["dplightning"]): a second copy here could
    # disagree with it and, restored later, silently replace the history the guard relies on.
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stopped_on_budget": self.stopped_on_budget, "target_epsilon": self.target_epsilon}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Older checkpoints also hold an "accountant" entry here; it is ignored on purpose (see above).
        self.stopped_on_budget = bool(state_dict.get("stopped_on_budget", False))
