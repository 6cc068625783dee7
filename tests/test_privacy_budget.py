"""PrivacyBudget: δ consistent with the strategy's, and the strategy as the only checkpointed accountant."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dplightning.callbacks import PrivacyBudget
from dplightning.errors import DPLightningError
from dplightning.strategies import DPSGDStrategy, DPZOStrategy

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class Regression(pl.LightningModule):
    """Per-example squared error of a linear map ``[B]``: trainable by both DP-SGD and DP-ZO."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(d, 1)

    def per_example_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return 0.5 * (self.fc(x).squeeze(1) - y).pow(2)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)


def _strategy(kind: str) -> DPSGDStrategy | DPZOStrategy:
    if kind == "dpzo":
        return DPZOStrategy(noise_multiplier=1.0, target_delta=1e-5, device="cpu", seed=3)
    return DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-5, device="cpu", seed=3)


def _budget_key(checkpoint: dict[str, Any]) -> str:
    return next(k for k in checkpoint["callbacks"] if "PrivacyBudget" in k)


@pytest.mark.parametrize("report_delta", [1e-6, 1e-4])
def test_a_report_delta_other_than_the_strategys_is_refused(report_delta: float) -> None:
    # The strategy enforces ε at its own δ = 1e-5: a budget stated at another δ would not be what is enforced.
    trainer = quiet_trainer(_strategy("dpsgd"), [PrivacyBudget(target_delta=report_delta)], max_steps=2)
    with pytest.raises(DPLightningError, match="set the strategy's target_delta"):
        trainer.fit(Regression(), _loader())


def test_the_strategys_own_delta_is_accepted_and_reported() -> None:
    strategy = _strategy("dpsgd")
    trainer = quiet_trainer(strategy, [PrivacyBudget(target_delta=1e-5)], max_steps=2)
    trainer.fit(Regression(), _loader())
    assert trainer.callback_metrics["privacy/delta"].item() == pytest.approx(1e-5)
    assert trainer.callback_metrics["privacy/epsilon"].item() == pytest.approx(strategy.epsilon(), rel=1e-5)


def test_checkpoint_holds_the_accountant_only_in_the_strategy_state(tmp_path: Path) -> None:
    budget = PrivacyBudget()
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    quiet_trainer(_strategy("dpsgd"), [budget, ckpt_cb], max_steps=2, checkpoints=True).fit(
        Regression(), _loader()
    )
    assert "accountant" not in budget.state_dict()
    checkpoint = torch.load(next(tmp_path.glob("*step=2.ckpt")), weights_only=False)
    assert "accountant" not in checkpoint["callbacks"][_budget_key(checkpoint)]
    assert checkpoint["dplightning"]["accountant"]


@pytest.mark.parametrize("kind", ["dpsgd", "dpzo"])
def test_resume_takes_the_accountant_from_the_strategy_not_an_old_callback_copy(
    tmp_path: Path, kind: str
) -> None:
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    quiet_trainer(_strategy(kind), [PrivacyBudget(), ckpt_cb], max_steps=3, checkpoints=True).fit(
        Regression(), _loader()
    )
    step1 = torch.load(next(tmp_path.glob("*step=1.ckpt")), weights_only=False)
    step3 = torch.load(next(tmp_path.glob("*step=3.ckpt")), weights_only=False)
    # An older checkpoint layout: the callback also held an accountant, here one that disagrees (1 step, not 3).
    step3["callbacks"][_budget_key(step3)]["accountant"] = step1["dplightning"]["accountant"]
    old = tmp_path / "old_layout.ckpt"
    torch.save(step3, old)

    strategy = _strategy(kind)
    quiet_trainer(strategy, [PrivacyBudget()], max_steps=4).fit(Regression(), _loader(), ckpt_path=str(old))
    assert strategy.accountant.steps == 4  # the 3 steps of the strategy's state, then one more
