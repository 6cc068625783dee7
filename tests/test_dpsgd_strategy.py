"""DPSGDStrategy end to end on small non-LM modules: clipping, noise scale, accumulation, budget, resume, errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import GradRecorder, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dplightning.callbacks import PrivacyBudget
from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.privacy.accounting import compute_epsilon
from dplightning.strategies import DPSGDStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


class Linear(pl.LightningModule):
    def __init__(self, d_in: int = 8, d_out: int = 3, bias: bool = True, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(d_in, d_out, bias=bias)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.fc(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(n: int = 64, d: int = 8, scale: float = 1.0, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g) * scale, torch.randint(0, 3, (n,), generator=g))


def test_noiseless_step_is_mean_of_clipped_per_example_grads() -> None:
    data = _data(16, scale=5.0)
    model = Linear()
    rec = GradRecorder()
    strategy = DPSGDStrategy(noise_multiplier=0.0, max_grad_norm=0.5)
    quiet_trainer(strategy, [rec], max_steps=1).fit(
        model, DataLoader(data, batch_size=16)
    )  # q = 1: every example
    ref = Linear()
    expected = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for i in range(16):
        ref.zero_grad()
        x, y = data[i]
        nn.functional.cross_entropy(ref.fc(x[None]), y[None]).backward()
        norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in ref.parameters()))
        for n, p in ref.named_parameters():
            expected[n] += p.grad * min(1.0, 0.5 / norm)
    for n, g in rec.grads[0].items():
        torch.testing.assert_close(g, expected[n] / 16, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_noise_has_stated_std(clipping: str) -> None:
    # Zero inputs and no bias: the data gradient is exactly 0, so p.grad is pure noise / (qN).
    n, batch = 200, 20
    data = TensorDataset(torch.zeros(n, 64), torch.zeros(n, dtype=torch.long))
    model = Linear(64, 64, bias=False)
    rec = GradRecorder()
    strategy = DPSGDStrategy(noise_multiplier=1.3, max_grad_norm=2.0, clipping=clipping, seed=3)  # type: ignore[arg-type]
    quiet_trainer(strategy, [rec], max_steps=5).fit(model, DataLoader(data, batch_size=batch))
    samples = torch.cat([g["fc.weight"].flatten() for g in rec.grads]) * batch  # qN = batch
    expected_std = 1.3 * 2.0
    # 20480 samples: the std estimate is within ~1.5% (3 sigma); mean near 0
    assert abs(samples.std().item() / expected_std - 1) < 0.03
    assert abs(samples.mean().item()) < 4 * expected_std / math.sqrt(samples.numel())
    assert strategy.effective_noise_multiplier == pytest.approx(1.3)


def test_heteroscedastic_groups_get_their_own_std_and_sigma_eff_is_charged() -> None:
    n, batch = 100, 10
    data = TensorDataset(torch.zeros(n, 32), torch.zeros(n, dtype=torch.long))
    model = nn.Module()

    class Two(Linear):
        def __init__(self) -> None:
            super().__init__(32, 32, bias=False)
            self.fc2 = nn.Linear(32, 3, bias=False)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.fc2(self.fc(x)), y)

    model = Two()
    rec = GradRecorder()
    strategy = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, clipping="per_layer", seed=1)

    class SetNoise(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            strategy.set_clip_thresholds({"fc.weight": 0.5, "fc2.weight": 2.0})
            strategy.set_noise_multipliers({"fc.weight": 2.0, "fc2.weight": 4.0})

    quiet_trainer(strategy, [SetNoise(), rec], max_steps=20).fit(model, DataLoader(data, batch_size=batch))
    fc = torch.cat([g["fc.weight"].flatten() for g in rec.grads]) * batch
    fc2 = torch.cat([g["fc2.weight"].flatten() for g in rec.grads]) * batch
    assert fc.std().item() == pytest.approx(2.0 * 0.5, rel=0.05)
    assert fc2.std().item() == pytest.approx(4.0 * 2.0, rel=0.1)
    sigma_eff = (2.0**-2 + 4.0**-2) ** -0.5
    assert strategy.effective_noise_multiplier == pytest.approx(sigma_eff)
    assert strategy.epsilon() == pytest.approx(compute_epsilon(sigma_eff, 0.1, 20, 1e-5), rel=1e-3)


def test_gradient_accumulation_equals_one_large_batch() -> None:
    data = _data(60)

    def run(batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
        model = Linear()
        strategy = DPSGDStrategy(noise_multiplier=0.8, max_grad_norm=1.0, seed=7)
        quiet_trainer(strategy, max_steps=4, accumulate_grad_batches=accumulate).fit(
            model, DataLoader(data, batch_size=batch_size)
        )
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    one, accumulated = run(12, 1), run(6, 2)
    for n in one:
        torch.testing.assert_close(one[n], accumulated[n], atol=1e-6, rtol=1e-5)


def test_weights_change_and_empty_batches_are_noise_only_steps() -> None:
    data = _data(20)
    model = Linear()
    before = model.fc.weight.detach().clone()
    strategy = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    # batch_size 1 of 20: q = 0.05, so about a third of the 30 Poisson batches are empty
    quiet_trainer(strategy, max_steps=30).fit(model, DataLoader(data, batch_size=1))
    assert strategy.accountant.steps == 30
    assert not torch.equal(before, model.fc.weight)
    assert strategy._sampler is not None
    sizes = [len(strategy._sampler.logical_batch(i)) for i in range(20)]
    assert 0 in sizes


def test_privacy_budget_stops_before_exceeding_target() -> None:
    data = _data(50)
    model = Linear()
    strategy = DPSGDStrategy(noise_multiplier=0.9, max_grad_norm=1.0)
    budget = PrivacyBudget(target_epsilon=1.0)
    trainer = quiet_trainer(strategy, [budget], max_steps=500)
    trainer.fit(model, DataLoader(data, batch_size=10))
    assert budget.stopped_on_budget
    assert 0 < trainer.global_step < 500
    assert strategy.epsilon() <= 1.0
    # one more step would have broken the budget
    assert compute_epsilon(0.9, 0.2, strategy.accountant.steps + 1, 1e-5) > 1.0


def test_target_epsilon_calibrates_sigma() -> None:
    data = _data(100)
    strategy = DPSGDStrategy(target_epsilon=2.0, target_delta=1e-5, max_grad_norm=1.0)
    quiet_trainer(strategy, max_steps=25).fit(Linear(), DataLoader(data, batch_size=10))
    eps = strategy.epsilon()
    assert eps <= 2.0
    assert eps > 1.9  # σ is the smallest that meets the target, not an over-noised guess


def test_drop_in_example_trains_privately() -> None:
    import drop_in_classification

    result = drop_in_classification.main(epsilon=3.0, max_epochs=3)
    assert result["epsilon"] <= 3.0
    assert result["val_acc"] > 0.75


def test_resume_gives_same_weights_and_epsilon(tmp_path: Path) -> None:
    data = _data(40)

    def strategy() -> DPSGDStrategy:
        return DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=5)

    full = Linear()
    s_full = strategy()
    quiet_trainer(s_full, max_steps=6).fit(full, DataLoader(data, batch_size=8))

    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    part = Linear()
    quiet_trainer(strategy(), [ckpt_cb], max_steps=3, enable_checkpointing=True).fit(
        part, DataLoader(data, batch_size=8)
    )
    ckpt = next(tmp_path.glob("*step=3.ckpt"))
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files
    resumed = Linear()
    s_resumed = strategy()
    quiet_trainer(s_resumed, max_steps=6).fit(resumed, DataLoader(data, batch_size=8), ckpt_path=str(ckpt))
    assert s_resumed.accountant.steps == 6
    assert s_resumed.epsilon() == pytest.approx(s_full.epsilon(), rel=1e-9)
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_clear_errors() -> None:
    with pytest.raises(DPLightningError, match="noise_multiplier or target_epsilon"):
        DPSGDStrategy()
    with pytest.raises(DPLightningError, match="target_delta"):
        DPSGDStrategy(noise_multiplier=1.0, target_delta=1.0)
    with pytest.raises(DPLightningError, match="clipping"):
        DPSGDStrategy(noise_multiplier=1.0, clipping="weird")  # type: ignore[arg-type]
    # planned steps at a fixed σ cannot meet the target
    with pytest.raises(PrivacyBudgetError, match="target"):
        quiet_trainer(DPSGDStrategy(noise_multiplier=0.3, target_epsilon=0.5), max_steps=50).fit(
            Linear(), DataLoader(_data(50), batch_size=10)
        )
    # q > 1
    with pytest.raises(DPLightningError, match="sample rate"):
        quiet_trainer(DPSGDStrategy(noise_multiplier=1.0), max_steps=1).fit(
            Linear(), DataLoader(_data(8), batch_size=16)
        )
    # batch norm
    bn = Linear()
    bn.fc = nn.Sequential(nn.Linear(8, 3), nn.BatchNorm1d(3))  # type: ignore[assignment]
    with pytest.raises(DPLightningError, match="batch norm"):
        quiet_trainer(DPSGDStrategy(noise_multiplier=1.0), max_steps=1).fit(
            bn, DataLoader(_data(16), batch_size=4)
        )
    # nothing trainable
    frozen = Linear()
    frozen.fc.requires_grad_(False)
    with pytest.raises(DPLightningError, match="no trainable parameters"):
        quiet_trainer(DPSGDStrategy(noise_multiplier=1.0), max_steps=1).fit(
            frozen, DataLoader(_data(16), batch_size=4)
        )


def test_each_epoch_draws_fresh_poisson_batches() -> None:
    """Lightning must advance the Poisson sampler's epoch: replaying epoch 0's batches would void the
    subsampling amplification the accountant assumes."""
    seen: list[torch.Tensor] = []

    class Batches(pl.Callback):
        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
        ) -> None:
            seen.append(batch[0].sum())

    data = _data(40)
    quiet_trainer(DPSGDStrategy(noise_multiplier=1.0, seed=3), [Batches()], max_steps=10).fit(
        Linear(), DataLoader(data, batch_size=8)
    )  # 5 logical batches per epoch: steps 5..9 are epoch 1
    assert len(seen) == 10
    assert not all(torch.equal(a, b) for a, b in zip(seen[:5], seen[5:]))


def test_noise_batches_cover_every_tensor_once_in_order() -> None:
    from dplightning.strategies.dpsgd import _noise_batches

    sums = {n: torch.zeros(k, dtype=torch.int64) for n, k in (("a", 3), ("b", 3), ("c", 3), ("d", 10))}
    names = list(sums)
    assert _noise_batches(names, sums, 5) == [["a", "b"], ["c", "d"]]
    assert _noise_batches(names, sums, 1) == [["a"], ["b"], ["c"], ["d"]]
    assert _noise_batches(names, sums, 100) == [names]
    assert _noise_batches([], sums, 5) == []


def test_a_loss_scaler_is_refused() -> None:
    """16-mixed's GradScaler scales the loss before backward and unscales after the release: the clip would act
    on scaled gradients and the update would shrink by the scale. (On CPU Lightning turns 16-mixed into bf16.)"""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(DPLightningError, match="GradScaler"):
        quiet_trainer(DPSGDStrategy(noise_multiplier=1.0), max_steps=1, plugins=[scaled]).fit(
            Linear(), DataLoader(_data(16), batch_size=4)
        )
