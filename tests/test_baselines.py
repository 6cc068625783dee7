"""Adaptive-clipping baselines: QuantileClipping, AutomaticClipping, NoiseSchedule."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import ROOT, clipped_sums, fake_dpsgd_strategy, quiet_trainer, run_dplightning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dplightning.callbacks import AutomaticClipping, NoiseSchedule, QuantileClipping
from dplightning.callbacks.noise_schedule import calibrate_schedule, schedule_epsilon, schedule_shape
from dplightning.callbacks.quantile_clipping import COUNT_CHANNEL
from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.privacy.accounting import compute_epsilon
from dplightning.strategies import DPSGDStrategy


def _fake_strategy(sigma: float, groups: int = 1, q: float = 0.05, batch: float = 200.0) -> DPSGDStrategy:
    names = {f"g{i}": [f"g{i}.weight"] for i in range(groups)}
    return fake_dpsgd_strategy(names, 1.0, sigma, q, 100, batch, noise_multiplier=sigma, accountant="rdp")


class Linear(pl.LightningModule):
    def __init__(self, d_in: int = 8, d_out: int = 3, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(d_in, d_out, bias=bias)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.fc(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n: int = 200, d: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.logspace(-1, 1, n)[:, None]  # wide norm range
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), batch_size=20)


# ------------------------------------------------------------------------------------------ quantile
@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.8])
def test_quantile_threshold_converges_to_target_quantile(quantile: float) -> None:
    strategy = _fake_strategy(sigma=1.0)
    qc = QuantileClipping(target_quantile=quantile, learning_rate=0.2, count_noise_std=10.0, seed=1)
    qc.initialise(strategy)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(400):  # norms ~ LogNormal(0, 1): the γ-quantile is exp(Φ^-1(γ))
        norms = torch.exp(torch.randn(200, generator=gen))
        history.append(qc.update({"g0": norms})["g0"])
    true_q = math.exp(torch.distributions.Normal(0, 1).icdf(torch.tensor(quantile)).item())
    estimate = float(np.mean(history[-100:]))
    assert estimate == pytest.approx(true_q, rel=0.1), (estimate, true_q)
    assert (
        history[0] != pytest.approx(true_q, rel=0.1) or quantile == 0.5
    )  # it moved there (C_0 = 1 = median)


def test_quantile_split_costs_exactly_sigma_and_count_noise_is_sigma_b() -> None:
    strategy = _fake_strategy(sigma=1.2, groups=1, batch=200.0)
    qc = QuantileClipping(count_noise_std=10.0)
    qc.initialise(strategy)
    # σ_grad = (σ^-2 − (2σ_b)^-2)^-1/2 and the combined step costs σ
    assert qc.sigma_grad == pytest.approx((1.2**-2 - 20.0**-2) ** -0.5, rel=1e-9)
    assert strategy.auxiliary_noise_multipliers[COUNT_CHANNEL] == pytest.approx(20.0, rel=1e-9)
    assert strategy.effective_noise_multiplier == pytest.approx(1.2, rel=1e-9)
    assert strategy.effective_noise_multiplier >= 1.2
    assert qc.count_noise_std_per_count == pytest.approx(10.0, rel=1e-9)
    # the released fraction has noise std σ_b / m around the true unclipped fraction (all unclipped here)
    draws = [
        1.0 - qc.release.release({"g0": torch.zeros(200)}, strategy.clip_thresholds, qc.sigma_count)[0]
        for _ in range(3000)
    ]
    assert np.mean(draws) == pytest.approx(1.0, abs=0.005)
    assert np.std(draws) == pytest.approx(10.0 / 200.0, rel=0.05)
    with pytest.raises(DPLightningError, match="count_noise_std"):
        QuantileClipping(count_noise_std=0.5).initialise(_fake_strategy(sigma=1.2))


def test_quantile_clipping_in_training_moves_thresholds_and_charges_budgeted_sigma() -> None:
    strategy = DPSGDStrategy(
        noise_multiplier=1.1,
        max_grad_norm=100.0,
        clipping="per_layer",
        accountant="rdp",
        device="cpu",
        seed=0,
    )
    qc = QuantileClipping(target_quantile=0.5, learning_rate=0.5, count_budget_fraction=0.1)
    quiet_trainer(strategy, [qc], max_steps=15).fit(Linear(), _data())
    assert strategy.accountant.steps == 15
    # thresholds started far above every norm (C_total = 100) and were pulled down towards the median
    assert all(c < 100.0 / math.sqrt(2) * 0.2 for c in strategy.clip_thresholds.values())
    # the accountant charged the budgeted σ every step: ε equals plain DP-SGD at σ = 1.1
    expected = compute_epsilon(1.1, strategy.sample_rate, 15, 1e-5, accountant="rdp")
    assert strategy.epsilon() == pytest.approx(expected, rel=1e-9)
    assert strategy.effective_noise_multiplier == pytest.approx(1.1, rel=1e-9)


# ----------------------------------------------------------------------------------------- automatic
def test_normalisation_bounds_each_contribution_by_threshold() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = {"w": torch.randn(32, 5, 4, generator=gen) * torch.logspace(-3, 3, 32)[:, None, None]}
    groups = {"all": ["w"]}
    for i in range(32):  # each example's normalised contribution alone: norm < C = 1, ≈ 1 for large grads
        single = {"w": grads["w"][i : i + 1]}
        summed, norms = clipped_sums(single, groups, {"all": 1.0}, stability=0.01)
        out = summed["w"].norm().item()
        assert out < 1.0
        assert out == pytest.approx(norms["all"].item() / (norms["all"].item() + 0.01), rel=1e-5)
    # unlike clipping, small gradients are scaled *up* (normalised), not left alone
    small = {"w": grads["w"][:1]}
    clipped, _ = clipped_sums(small, groups, {"all": 1.0})
    normed, _ = clipped_sums(small, groups, {"all": 1.0}, stability=0.01)
    assert normed["w"].norm() > 10 * clipped["w"].norm()


def test_automatic_clipping_callback_normalises_in_training() -> None:
    def run(callbacks: list[pl.Callback]) -> tuple[list[float], list[int], DPSGDStrategy]:
        norms: list[float] = []
        sizes: list[int] = []
        strategy = DPSGDStrategy(noise_multiplier=0.0, max_grad_norm=1.0, device="cpu")

        class Spy(pl.Callback):
            def on_train_batch_start(
                self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
            ) -> None:
                sizes.append(len(batch[0]))

            def on_before_optimizer_step(
                self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any
            ) -> None:
                g = torch.cat([p.grad.flatten() for p in pl_module.parameters()])
                norms.append(float(g.norm()) * strategy.expected_batch_size)  # norm of the clipped sum

        g = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(100, 8, generator=g) * 1e-3, torch.randint(0, 3, (100,), generator=g)
        )
        quiet_trainer(strategy, [*callbacks, Spy()], max_steps=3).fit(
            Linear(bias=False), DataLoader(data, batch_size=20)
        )
        return norms, sizes, strategy

    auto, sizes, strategy = run([AutomaticClipping(stability=1e-5)])
    clipped, _, _ = run([])
    assert strategy.normalization_stability is None  # reset at teardown
    # every per-example contribution has norm < C = 1, so the noiseless sum of B of them has norm ≤ B ...
    assert all(0 < n <= b for n, b in zip(auto, sizes)), (auto, sizes)
    # ... while tiny gradients (norm ~3e-3) are scaled up to ~C instead of being left alone as clipping does
    assert min(auto) > 50 * max(clipped)
    with pytest.raises(DPLightningError, match="stability"):
        AutomaticClipping(stability=0.0)


# ------------------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("kind", ["linear", "exponential", "step"])
def test_schedule_shapes_decay(kind: str) -> None:
    shape = schedule_shape(kind, 50, 0.25, num_stages=5)  # type: ignore[arg-type]
    assert shape[0] == 1.0 and shape[-1] == pytest.approx(0.25)
    assert np.all(np.diff(shape) <= 1e-12) and shape[10] < 1.0


def test_schedule_calibration_meets_target_tightly_pld() -> None:
    shape = schedule_shape("step", 100, 0.5, num_stages=3)
    sigmas = calibrate_schedule(2.0, 1e-5, 0.05, shape, "pld")
    eps = schedule_epsilon(sigmas, 0.05, 1e-5, "pld")
    assert eps <= 2.0
    assert sigmas[0] > sigmas[-1] and sigmas[-1] == pytest.approx(sigmas[0] / 2, rel=0.1)
    # tight: σ_0 one σ_0-grid step lower (1.2 %) would overspend, i.e. the budget is used
    lower = sigmas * 10 ** (-1 / 100)
    assert schedule_epsilon(lower, 0.05, 1e-5, "pld") > 2.0 * 0.97
    with pytest.raises(PrivacyBudgetError):
        calibrate_schedule(1e-4, 1e-5, 1.0, schedule_shape("linear", 1000, 0.1), "rdp")


def test_noise_schedule_in_training_decays_and_stays_within_budget() -> None:
    strategy = DPSGDStrategy(target_epsilon=3.0, target_delta=1e-5, accountant="rdp", device="cpu")
    sched = NoiseSchedule(schedule="linear", final_ratio=0.4)
    used: list[float] = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, *args: Any) -> None:
            used.append(strategy.effective_noise_multiplier)

    quiet_trainer(strategy, [sched, Spy()], max_steps=30).fit(Linear(), _data())
    assert strategy.accountant.steps == 30
    assert used[0] > used[-1] and used[-1] == pytest.approx(used[0] * 0.4, rel=0.1)
    assert all(a >= b for a, b in itertools.pairwise(used))
    assert strategy.epsilon() <= 3.0
    assert strategy.epsilon() > 3.0 * 0.9  # the budget is spent, not wasted
    assert len(strategy.accountant.history) > 5  # heterogeneous steps


def test_noise_schedule_refuses_controllers_that_also_set_sigma() -> None:
    strategy = DPSGDStrategy(target_epsilon=3.0, device="cpu")
    with pytest.raises(DPLightningError, match="QuantileClipping"):
        quiet_trainer(strategy, [NoiseSchedule(), QuantileClipping()], max_steps=2).fit(Linear(), _data())
    with pytest.raises(DPLightningError, match="final_ratio"):
        NoiseSchedule(final_ratio=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quantile_clipping", "automatic_clipping", "noise_schedule"])
def test_baseline_configs_parse(name: str) -> None:
    out = run_dplightning(
        ["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"], timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    callback = {
        "quantile_clipping": "QuantileClipping",
        "automatic_clipping": "AutomaticClipping",
        "noise_schedule": "NoiseSchedule",
    }[name]
    assert f"dplightning.callbacks.{callback}" in out.stdout


@pytest.mark.parametrize("which", ["quantile", "schedule"])
def test_resume_continues_the_baseline_exactly(tmp_path: Any, which: str) -> None:
    """An interrupted run resumed from a checkpoint ends with the same thresholds, σ and ε as an uninterrupted one."""

    def parts() -> tuple[DPSGDStrategy, pl.Callback]:
        if which == "quantile":
            return (
                DPSGDStrategy(
                    noise_multiplier=1.0,
                    max_grad_norm=10.0,
                    clipping="per_layer",
                    accountant="rdp",
                    device="cpu",
                    seed=5,
                ),
                QuantileClipping(learning_rate=0.3, seed=2),
            )
        return (
            DPSGDStrategy(target_epsilon=3.0, accountant="rdp", device="cpu", seed=5),
            NoiseSchedule(schedule="exponential", final_ratio=0.5),
        )

    def trainer(
        strategy: DPSGDStrategy, callbacks: list[pl.Callback], steps: int, ckpt: bool = False
    ) -> pl.Trainer:
        return pl.Trainer(
            strategy=strategy,
            callbacks=callbacks,
            max_steps=steps,
            logger=False,
            enable_checkpointing=ckpt,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    s_full, cb_full = parts()
    trainer(s_full, [cb_full], 8).fit(Linear(), _data(200))
    s_part, cb_part = parts()
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)

    class Interrupt(pl.Callback):  # the same 8-step plan, cut after step 3 (as a crash would)
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            trainer.should_stop = trainer.global_step >= 3

    trainer(s_part, [cb_part, saver, Interrupt()], 8, ckpt=True).fit(Linear(), _data(200))
    ckpt = next(tmp_path.glob("*step=3.ckpt"))
    s_res, cb_res = parts()
    trainer(s_res, [cb_res], 8).fit(Linear(), _data(200), ckpt_path=str(ckpt))
    assert s_res.accountant.steps == 8
    assert s_res.epsilon() == pytest.approx(s_full.epsilon(), rel=1e-9)
    assert s_res.effective_noise_multiplier == pytest.approx(s_full.effective_noise_multiplier, rel=1e-9)
    for g, c in s_full.clip_thresholds.items():
        assert s_res.clip_thresholds[g] == pytest.approx(c, rel=1e-9), g
    if which == "quantile":
        assert s_full.clip_thresholds != {
            g: 10.0 / math.sqrt(2) for g in s_full.clip_thresholds
        }  # they moved


@pytest.mark.parametrize("callback", [NoiseSchedule, QuantileClipping])
def test_sigma_controllers_refuse_lmo_noise(callback: type[pl.Callback]) -> None:
    """σ controllers calibrate Gaussian releases: on an LMO strategy they must refuse at setup, not mid-run."""
    strategy = _fake_strategy(1.0)
    strategy.noise = "lmo"
    trainer = SimpleNamespace(strategy=strategy, callbacks=[], datamodule=None)
    with pytest.raises(DPLightningError, match="noise='lmo'"):
        callback().setup(trainer, Linear(), "fit")
    strategy.noise = "gaussian"
    callback().setup(trainer, Linear(), "fit")  # the same strategy with Gaussian noise is accepted


def test_quantile_clipping_refuses_ddp() -> None:
    strategy = DPSGDStrategy(noise_multiplier=1.0, device="cpu")
    strategy.world_size = 2  # what a DDP strategy reports
    with pytest.raises(DPLightningError, match="without DDP"):
        QuantileClipping().setup(SimpleNamespace(strategy=strategy, callbacks=[]), Linear(), "fit")
