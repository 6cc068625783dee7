"""DPZOStrategy: SPSA estimator, exact restore, scalar clipping, noise scale, accounting, training, resume, modes."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer
from scipy import stats
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dplightning.callbacks import PrivacyBudget
from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.privacy.accounting import (
    compute_epsilon,
    pure_epsilon_laplace,
)
from dplightning.strategies import DPZOStrategy
from dplightning.strategies.dpzo import (
    PureLaplaceAccountant,
    ZerothOrderEstimator,
    direction_seed,
    pure_laplace_multiplier,
)

warnings.filterwarnings("ignore", ".*does not have many workers.*")


# ---------------------------------------------------------------------------------------------- toy model
class Center(nn.Module):
    """Holds θ ``[d]``; forward returns the residuals ``x − θ`` ``[B, d]`` (θ is read inside forward)."""

    def __init__(self, d: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(-1.0, 1.0, d, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x - self.theta


class Quadratic(pl.LightningModule):
    """Per-example loss ``f_i(θ) = ½ Σ_j a_j (x_ij − θ_j)²`` ``[B]``; gradient of the mean ``Σ_i a (θ − x_i) / B``."""

    def __init__(
        self, d: int = 6, lr: float = 0.05, scale: float = 1.0, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.center = Center(d, dtype)
        self.register_buffer("a", torch.linspace(0.5, 2.0, d, dtype=dtype) * scale)
        self.lr = lr

    def per_example_loss(self, batch: Any) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        r = self.center(x.to(self.a.dtype))
        return 0.5 * (self.a * r * r).sum(1)

    def grad(self, x: Tensor) -> Tensor:
        return (self.a * (self.center.theta.detach() - x)).mean(0)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _points(n: int = 32, d: int = 6, seed: int = 0, scale: float = 1.0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g) * scale)


# --------------------------------------------------------------------------------------------- estimator
def test_spsa_estimator_is_unbiased_on_a_quadratic() -> None:
    model = Quadratic(d=6, dtype=torch.float64)
    x = _points(16, 6, seed=1).tensors[0].double()
    est = ZerothOrderEstimator(model, [("center.theta", model.center.theta)], mu=1e-3)
    grad = model.grad(x)
    total = torch.zeros_like(grad)
    draws = 4000
    for s in range(draws):
        diffs, _ = est.directional_derivatives(lambda: model.per_example_loss(x), s)
        (z,) = est.direction(s)
        # a quadratic's central difference is exact: the per-step scalar is the directional derivative ∇f·z
        assert diffs.mean().item() == pytest.approx(float(grad @ z), rel=1e-6, abs=1e-9)
        total += diffs.mean() * z
    mean = total / draws
    # E[(∇f·z) z] = ∇f; coordinate j of one draw has std sqrt(|∇f|² + ∇f_j²) ≤ √2 |∇f|
    tol = 5 * math.sqrt(2) * grad.norm().item() / math.sqrt(draws)
    assert (mean - grad).abs().max().item() < tol
    assert torch.nn.functional.cosine_similarity(mean, grad, dim=0).item() > 0.99


def test_directions_are_regenerated_from_the_seed_and_chunked_consistently() -> None:
    p = nn.Parameter(torch.zeros(2500))
    est = ZerothOrderEstimator(nn.Module(), [("p", p)], mu=1e-3, perturbation="inplace", chunk_size=1000)
    (z1,) = est.direction(7)
    (z2,) = est.direction(7)
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, est.direction(8)[0])
    est.add_direction(7, 0.5)
    assert torch.equal(p.detach(), 0.5 * z1)
    # the seed is a pure function of (seed, step, direction): resume-safe, distinct across steps/directions
    assert direction_seed(0, 5, 0) == direction_seed(0, 5, 0)
    assert len({direction_seed(0, s, k) for s in range(50) for k in range(3)}) == 150


def test_swap_mode_restores_theta_bit_exactly_over_1000_perturbations() -> None:
    model = Quadratic(d=64)
    x = _points(8, 64).tensors[0]
    theta0 = model.center.theta.detach().clone()
    est = ZerothOrderEstimator(model, [("center.theta", model.center.theta)], mu=1e-3, perturbation="swap")
    for s in range(1000):
        est.directional_derivatives(lambda: model.per_example_loss(x), s)
    assert torch.equal(model.center.theta.detach(), theta0)
    assert model.center._parameters["theta"] is model.center.theta  # the Parameter object is back
    assert isinstance(model.center.theta, nn.Parameter)


def test_inplace_mode_drift_stays_within_rounding_of_each_step() -> None:
    model = Quadratic(d=64)
    x = _points(8, 64).tensors[0]
    theta = model.center.theta
    est = ZerothOrderEstimator(model, [("center.theta", theta)], mu=1e-3, perturbation="inplace")
    theta0 = theta.detach().clone()
    worst = 0.0
    for s in range(1000):
        before = theta.detach().clone()
        est.directional_derivatives(lambda: model.per_example_loss(x), s)
        (z,) = est.direction(s)
        # three roundings (θ+μz, −2μz, +μz), each ≤ ½ ulp of the largest intermediate |θ| + 2μ|z|
        ulp = torch.finfo(torch.float32).eps * (before.abs() + 2e-3 * z.abs())
        worst = max(worst, ((theta.detach() - before).abs() / ulp).max().item())
    assert worst <= 1.5
    assert (theta.detach() - theta0).abs().max().item() < 1e-5  # bounded: no systematic drift


def test_swap_mode_matches_inplace_estimates_on_the_tiny_lm(tiny_batch: dict[str, Tensor]) -> None:
    from dplightning.module import DPLoRAModule

    module = DPLoRAModule(model_name="tiny-llama", lora_rank=4, seed=0).eval()
    named = [(n, p) for n, p in module.named_parameters()]  # all params, base and LoRA
    before = {n: p.detach().clone() for n, p in named}
    swap = ZerothOrderEstimator(module, named, mu=1e-3, perturbation="swap")
    d_swap = [
        swap.directional_derivatives(lambda: module.per_example_loss(tiny_batch), s)[0] for s in range(3)
    ]
    swap.remove()
    assert all(torch.equal(p.detach(), before[n]) for n, p in named)
    inplace = ZerothOrderEstimator(module, named, mu=1e-3, perturbation="inplace")
    d_inplace = [
        inplace.directional_derivatives(lambda: module.per_example_loss(tiny_batch), s)[0] for s in range(3)
    ]
    for a, b in zip(d_swap, d_inplace):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert max(d.abs().max().item() for d in d_swap) > 0  # the perturbation reached the loss


# ---------------------------------------------------------------------------------------------- clipping
def test_per_example_scalars_are_clipped_and_the_update_follows_z() -> None:
    data = _points(16, 6, scale=20.0)  # large residuals: every |(L⁺−L⁻)/2μ| is far above C
    model = Quadratic(d=6, lr=0.1)
    reference = Quadratic(d=6)
    theta0 = model.center.theta.detach().clone()
    c = 0.5
    strategy = DPZOStrategy(mu=1e-3, max_loss_diff=c, noise_multiplier=0.0, device="cpu")
    quiet_trainer(strategy, max_steps=1).fit(model, DataLoader(data, batch_size=16))  # q = 1: every example
    est = ZerothOrderEstimator(reference, [("center.theta", reference.center.theta)], mu=1e-3)
    seed = direction_seed(0, 0, 0)
    raw, _ = est.directional_derivatives(lambda: reference.per_example_loss(data.tensors), seed)
    assert raw.abs().min().item() > c  # clipping is active on every example
    expected = raw.clamp(-c, c).sum() / 16
    assert strategy.last_projected_grads is not None
    assert strategy.last_projected_grads.item() == pytest.approx(expected.item(), rel=1e-9)
    assert abs(strategy.last_projected_grads.item()) <= c  # sum of B clipped scalars / B
    (z,) = est.direction(seed)
    torch.testing.assert_close(model.center.theta.detach(), theta0 - 0.1 * expected.float() * z)


def test_one_example_moves_the_released_sum_by_at_most_c() -> None:
    c = 0.3
    sums = []
    for scale in (1.0, 1e4):  # neighbouring datasets: example 0 replaced by an extreme one
        data = _points(8, 6, scale=2.0)
        data.tensors[0][0] *= scale
        strategy = DPZOStrategy(mu=1e-3, max_loss_diff=c, noise_multiplier=0.0, device="cpu")
        quiet_trainer(strategy, max_steps=1).fit(Quadratic(d=6), DataLoader(data, batch_size=8))
        assert strategy.last_projected_grads is not None
        sums.append(strategy.last_projected_grads.item() * 8)
    assert abs(sums[0] - sums[1]) <= 2 * c + 1e-9


def test_num_directions_average_their_updates() -> None:
    data = _points(16, 6)
    model, reference = Quadratic(d=6, lr=0.2), Quadratic(d=6)
    theta0 = model.center.theta.detach().clone()
    strategy = DPZOStrategy(
        mu=1e-3, max_loss_diff=100.0, noise_multiplier=0.0, num_directions=3, device="cpu"
    )
    quiet_trainer(strategy, max_steps=1).fit(model, DataLoader(data, batch_size=16))
    est = ZerothOrderEstimator(reference, [("center.theta", reference.center.theta)], mu=1e-3)
    grads = strategy.last_projected_grads
    assert grads is not None and grads.shape == (3,)
    update = torch.zeros(6)
    for k, g in enumerate(grads.tolist()):
        seed = direction_seed(0, 0, k)
        d, _ = est.directional_derivatives(lambda: reference.per_example_loss(data.tensors), seed)
        assert g == pytest.approx(d.mean().item(), rel=1e-9)
        update += g * est.direction(seed)[0]
    torch.testing.assert_close(model.center.theta.detach(), theta0 - 0.2 * update / 3)


# ------------------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("n", [1, 3])
def test_gaussian_noise_has_std_sigma_c_sqrt_n(n: int) -> None:
    strategy = DPZOStrategy(noise_multiplier=0.7, max_loss_diff=0.3, num_directions=n, device="cpu")
    draws = torch.stack([strategy.privatize(torch.zeros(n)) for _ in range(20000 // n)]).flatten().numpy()
    std = 0.7 * 0.3 * math.sqrt(n)
    assert strategy.noise_scale() == pytest.approx(std)
    assert stats.kstest(draws / std, "norm").pvalue > 1e-3
    assert draws.std() == pytest.approx(std, rel=0.03)


@pytest.mark.parametrize(("n", "delta"), [(1, 1e-5), (2, 0.0)])
def test_laplace_noise_has_scale_lambda_n_c(n: int, delta: float) -> None:
    strategy = DPZOStrategy(
        noise="laplace",
        noise_multiplier=0.5,
        max_loss_diff=0.2,
        target_delta=delta,
        num_directions=n,
        device="cpu",
    )
    draws = (
        torch.stack([strategy.privatize(torch.ones(n)) for _ in range(20000 // n)]).flatten().numpy() - 1.0
    )
    b = 0.5 * 0.2 * n
    assert strategy.noise_scale() == pytest.approx(b)
    assert stats.kstest(draws / b, "laplace").pvalue > 1e-3
    assert abs(draws).mean() == pytest.approx(b, rel=0.03)  # E|X| = b for Laplace(0, b)
    assert stats.kstest(draws / draws.std(), "norm").pvalue < 1e-6  # heavier tails than a Gaussian


# -------------------------------------------------------------------------------------------- accounting
@pytest.mark.parametrize(
    ("noise", "delta", "accountant"),
    [("gaussian", 1e-5, "pld"), ("gaussian", 1e-5, "rdp"), ("laplace", 1e-5, "pld"), ("laplace", 0.0, "pld")],
)
def test_epsilon_logged_matches_the_accountant_for_the_mechanism(
    noise: str, delta: float, accountant: str
) -> None:
    data = _points(64, 6)
    sigma, q, steps = 1.3, 8 / 64, 5
    strategy = DPZOStrategy(
        noise=noise,
        noise_multiplier=sigma,
        target_delta=delta,
        accountant=accountant,
        device="cpu",  # type: ignore[arg-type]
    )
    trainer = quiet_trainer(strategy, [PrivacyBudget()], max_steps=steps)
    trainer.fit(Quadratic(), DataLoader(data, batch_size=8))
    assert strategy.accountant.steps == steps
    if delta == 0:
        assert isinstance(strategy.accountant, PureLaplaceAccountant)
        expected = pure_epsilon_laplace(sigma, q, steps)
    else:
        expected = compute_epsilon(sigma, q, steps, delta, accountant, noise)  # type: ignore[arg-type]
    assert strategy.epsilon() == pytest.approx(expected, rel=1e-9)
    assert trainer.callback_metrics["privacy/epsilon"].item() == pytest.approx(expected, rel=1e-5)
    assert trainer.callback_metrics["privacy/delta"].item() == pytest.approx(delta)
    assert trainer.callback_metrics["privacy/clip_norm"].item() == pytest.approx(1.0)


@pytest.mark.parametrize(("noise", "delta"), [("gaussian", 1e-5), ("laplace", 1e-5), ("laplace", 0.0)])
def test_target_epsilon_calibrates_the_multiplier(noise: str, delta: float) -> None:
    data = _points(64, 6)
    strategy = DPZOStrategy(noise=noise, target_epsilon=2.0, target_delta=delta, device="cpu")  # type: ignore[arg-type]
    quiet_trainer(strategy, max_steps=8).fit(Quadratic(), DataLoader(data, batch_size=8))
    assert strategy.noise_multiplier is not None and strategy.noise_multiplier > 0
    eps = strategy.epsilon()
    assert eps <= 2.0 and eps > 1.9  # tight calibration over the planned 8 steps
    if delta == 0:
        lam = pure_laplace_multiplier(2.0, 8 / 64, 8)
        assert pure_epsilon_laplace(lam, 8 / 64, 8) == pytest.approx(2.0, rel=1e-9)


def test_budget_guard_stops_before_exceeding_target() -> None:
    data = _points(64, 6)
    strategy = DPZOStrategy(noise_multiplier=0.8, device="cpu")
    budget = PrivacyBudget(target_epsilon=2.0)
    quiet_trainer(strategy, [budget], max_steps=200).fit(Quadratic(), DataLoader(data, batch_size=16))
    assert budget.stopped_on_budget
    assert strategy.epsilon() <= 2.0
    assert strategy.accountant.steps < 200


def test_empty_poisson_batch_is_a_noise_only_step() -> None:
    data = _points(400, 6)
    model = Quadratic()
    theta0 = model.center.theta.detach().clone()
    strategy = DPZOStrategy(noise_multiplier=1.0, device="cpu")  # q = 1/400: most batches are empty
    quiet_trainer(strategy, max_steps=4).fit(model, DataLoader(data, batch_size=1))
    assert strategy.accountant.steps == 4
    assert not torch.equal(model.center.theta.detach(), theta0)


# --------------------------------------------------------------------------------------------- resume
class BatchRecorder(pl.Callback):
    """Records (global step, batch sum) and the released scalars of every step."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, list[float]]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        grads = trainer.strategy.last_projected_grads  # type: ignore[attr-defined]
        self.rows.append((trainer.global_step, float(batch[0].sum()), grads.tolist()))


@pytest.mark.parametrize("stop", [3, 8])  # mid-epoch and at the end of epoch 0 (8 batches per epoch)
def test_resume_reproduces_the_trajectory(stop: int, tmp_path: Path) -> None:
    data = _points(64, 6)

    def strategy() -> DPZOStrategy:
        return DPZOStrategy(noise_multiplier=1.0, max_loss_diff=2.0, num_directions=2, seed=3, device="cpu")

    full, s_full, rec_full = Quadratic(), strategy(), BatchRecorder()
    quiet_trainer(s_full, [rec_full], max_steps=11).fit(full, DataLoader(data, batch_size=8))
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop, save_top_k=-1)
    rec_part = BatchRecorder()
    quiet_trainer(strategy(), [ckpt_cb, rec_part], max_steps=stop, enable_checkpointing=True).fit(
        Quadratic(), DataLoader(data, batch_size=8)
    )
    resumed, s_resumed = Quadratic(), strategy()
    quiet_trainer(s_resumed, [rec_part], max_steps=11).fit(
        resumed, DataLoader(data, batch_size=8), ckpt_path=str(next(tmp_path.glob(f"*step={stop}.ckpt")))
    )
    assert rec_part.rows == rec_full.rows  # same batches, same released scalars, step by step
    assert s_resumed.accountant.steps == 11
    assert s_resumed.epsilon() == pytest.approx(s_full.epsilon(), rel=1e-12)
    assert torch.equal(resumed.center.theta.detach(), full.center.theta.detach())


def test_each_epoch_draws_fresh_poisson_batches() -> None:
    rec = BatchRecorder()
    quiet_trainer(DPZOStrategy(noise_multiplier=1.0, device="cpu"), [rec], max_steps=16).fit(
        Quadratic(), DataLoader(_points(64, 6), batch_size=8)
    )
    first, second = [r[1] for r in rec.rows[:8]], [r[1] for r in rec.rows[8:]]
    assert first != second  # epoch 1 is not a replay of epoch 0


def test_resume_with_a_different_mechanism_is_refused(tmp_path: Path) -> None:
    data = _points(64, 6)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    strategy = DPZOStrategy(noise_multiplier=1.0, device="cpu")
    quiet_trainer(strategy, [ckpt_cb], max_steps=2, enable_checkpointing=True).fit(
        Quadratic(), DataLoader(data, batch_size=8)
    )
    other = DPZOStrategy(noise="laplace", noise_multiplier=1.0, target_delta=0.0, device="cpu")
    with pytest.raises(DPLightningError, match="noise=gaussian"):
        quiet_trainer(other, max_steps=4).fit(
            Quadratic(), DataLoader(data, batch_size=8), ckpt_path=str(next(tmp_path.glob("*.ckpt")))
        )


# ---------------------------------------------------------------------------------------- tiny language model
@pytest.fixture(scope="module")
def tiny_data() -> Any:
    from dplightning.data import TextDataModule

    dm = TextDataModule(
        tokenizer="tiny-llama", num_records=240, max_length=32, batch_size=16, eval_batch_size=32
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def tiny_batch(tiny_data: Any) -> dict[str, Tensor]:
    return next(iter(tiny_data.val_dataloader()))


def _tiny_module(lr: float) -> Any:
    from dplightning.module import DPLoRAModule

    return DPLoRAModule(model_name="tiny-llama", lora_rank=4, seed=0, learning_rate=lr, optimizer="sgd")


def _heldout_loss(module: Any, batch: dict[str, Tensor]) -> float:
    module.eval()
    with torch.no_grad():
        loss = module.per_example_loss(batch).mean().item()
    module.train()
    return loss


def test_tiny_lm_loss_goes_down_without_noise_and_more_slowly_with_noise(
    tiny_data: Any, tiny_batch: Any
) -> None:
    def drop(sigma: float, seed: int) -> float:
        module = _tiny_module(lr=3e-3)
        start = _heldout_loss(module, tiny_batch)
        strategy = DPZOStrategy(
            mu=1e-3, max_loss_diff=2.0, noise_multiplier=sigma, trainable="all", device="cpu", seed=seed
        )
        quiet_trainer(strategy, max_steps=25, limit_val_batches=0).fit(module, datamodule=tiny_data)
        return start - _heldout_loss(module, tiny_batch)

    noiseless = drop(0.0, 0)
    noisy = [drop(6.0, seed) for seed in range(3)]  # one noise draw can help by luck: average three
    assert noiseless > 0.05
    assert 0.01 < sum(noisy) / len(noisy) < noiseless


@pytest.mark.parametrize("trainable", ["lora", "all"])
def test_lora_and_all_parameter_modes(trainable: str, tiny_data: Any, tmp_path: Path) -> None:
    module = _tiny_module(lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    lora_names = {n for n, p in module.named_parameters() if p.requires_grad}
    strategy = DPZOStrategy(mu=1e-2, noise_multiplier=0.5, trainable=trainable, device="cpu")  # type: ignore[arg-type]
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    quiet_trainer(strategy, [ckpt_cb], max_steps=2, limit_val_batches=0, enable_checkpointing=True).fit(
        module, datamodule=tiny_data
    )
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    saved = set(torch.load(next(tmp_path.glob("*.ckpt")), weights_only=False)["state_dict"])
    if trainable == "lora":
        assert changed == lora_names
        assert saved == lora_names
    else:
        assert changed == set(before)  # every parameter moves along z
        assert saved == set(before)  # and every parameter is checkpointed
    assert all(p.grad is None for p in module.parameters())  # no backward ever ran


class ReleaseRecorder(pl.Callback):
    """Records the released projected gradients ``[n]`` of every step."""

    def __init__(self) -> None:
        self.releases: list[Tensor] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        grads = trainer.strategy.last_projected_grads  # type: ignore[attr-defined]
        self.releases.append(grads.clone())


def test_bf16_mixed_releases_exactly_what_32_true_releases(tiny_data: Any) -> None:
    """The perturbed forwards run in the parameters' precision, never under bf16 autocast: with the same seed a
    ``bf16-mixed`` run releases the same scalars and ends with the same LoRA weights as a ``32-true`` run (on the
    tiny model bf16 would already move the losses' low bits, and so the grid units)."""
    target, steps = 4.0, 2
    runs = {}
    for precision in ("bf16-mixed", "32-true"):
        module = _tiny_module(lr=1e-2)
        before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        autocast: list[bool] = []
        per_example_loss = module.per_example_loss

        def probed(
            batch: Any, per_example_loss: Any = per_example_loss, autocast: list[bool] = autocast
        ) -> Tensor:
            autocast.append(torch.is_autocast_enabled("cpu"))
            return per_example_loss(batch)

        module.per_example_loss = probed  # type: ignore[method-assign]
        strategy = DPZOStrategy(mu=1e-2, noise_multiplier=1.0, target_epsilon=target, seed=5, device="cpu")
        recorder = ReleaseRecorder()
        trainer = quiet_trainer(
            strategy, [recorder], max_steps=steps, limit_val_batches=0, precision=precision
        )
        trainer.fit(module, datamodule=tiny_data)
        assert trainer.precision == precision
        assert autocast and not any(autocast)  # two forwards per direction, none under autocast
        assert strategy.accountant.steps == steps and len(recorder.releases) == steps
        assert 0 < strategy.epsilon() <= target
        assert strategy.expected_batch_size == 16
        for release in recorder.releases:
            assert release.dtype == torch.float64 and release.shape == (1,)
            # g = γ·(units + noise) / E: with E = 16 (a power of two) g·E/γ is exactly the integer release
            units = release * strategy.expected_batch_size / strategy.grid
            assert torch.equal(units, units.round())
        after = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        assert all(after[n].dtype == torch.float32 and not torch.equal(after[n], before[n]) for n in after)
        runs[precision] = (recorder.releases, after, strategy.epsilon())
    (bf16_releases, bf16_weights, bf16_eps), (fp32_releases, fp32_weights, fp32_eps) = runs.values()
    assert bf16_eps == fp32_eps
    for bf16, fp32 in zip(bf16_releases, fp32_releases):
        assert torch.equal(bf16, fp32)
    assert bf16_weights.keys() == fp32_weights.keys()
    for name, weight in bf16_weights.items():
        assert torch.equal(weight, fp32_weights[name]), name


# ------------------------------------------------------------------------------------------------ errors
def test_clear_errors() -> None:
    with pytest.raises(DPLightningError, match="noise_multiplier or target_epsilon"):
        DPZOStrategy()
    with pytest.raises(DPLightningError, match="unknown noise"):
        DPZOStrategy(noise="cauchy", noise_multiplier=1.0)  # type: ignore[arg-type]
    with pytest.raises(DPLightningError, match="needs noise='laplace'"):
        DPZOStrategy(noise_multiplier=1.0, target_delta=0.0)
    with pytest.raises(DPLightningError, match="num_directions=1 only"):
        DPZOStrategy(noise="laplace", noise_multiplier=1.0, num_directions=2)
    with pytest.raises(DPLightningError, match="accountant='pld'"):
        DPZOStrategy(noise="laplace", noise_multiplier=1.0, accountant="rdp")
    with pytest.raises(DPLightningError, match="num_directions"):
        DPZOStrategy(noise_multiplier=1.0, num_directions=0)
    with pytest.raises(DPLightningError, match="mu must be"):
        DPZOStrategy(noise_multiplier=1.0, mu=0.0)
    with pytest.raises(PrivacyBudgetError, match=r"ε=.* > target"):
        strategy = DPZOStrategy(noise_multiplier=0.3, target_epsilon=0.5, device="cpu")
        quiet_trainer(strategy, max_steps=50).fit(Quadratic(), DataLoader(_points(64, 6), batch_size=8))


def test_module_without_per_example_loss_is_refused() -> None:
    class NoPerExample(Quadratic):
        per_example_loss = None  # type: ignore[assignment]

    strategy = DPZOStrategy(noise_multiplier=1.0, device="cpu")
    with pytest.raises(DPLightningError, match="per_example_loss"):
        quiet_trainer(strategy, max_steps=1).fit(NoPerExample(), DataLoader(_points(16, 6), batch_size=4))


@pytest.mark.parametrize(
    ("layer", "message"), [(nn.Dropout(0.1), "applies dropout"), (nn.BatchNorm1d(6), "is batch norm")]
)
def test_example_mixing_in_train_mode_forwards_is_refused(layer: nn.Module, message: str) -> None:
    """With ``eval_forwards=False`` the forwards would apply dropout masks or batch statistics, which couple an
    example's loss to the rest of the batch; in eval mode (the default) both are off and the module is accepted."""
    mixed = Quadratic()
    mixed.mix = layer
    with pytest.raises(DPLightningError, match=rf"{message}.*or keep eval_forwards=True"):
        strategy = DPZOStrategy(noise_multiplier=1.0, eval_forwards=False, device="cpu")
        quiet_trainer(strategy, max_steps=1).fit(mixed, DataLoader(_points(16, 6), batch_size=4))
    quiet_trainer(DPZOStrategy(noise_multiplier=1.0, device="cpu"), max_steps=1).fit(
        mixed, DataLoader(_points(16, 6), batch_size=4)
    )
