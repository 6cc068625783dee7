"""Regression tests for attacks on the release itself: floating-point low bits, mixed-precision sums, a
non-finite record, predictable randomness, and loop settings that release part of a Poisson batch."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import GradRecorder, clipped_sums, quiet_trainer
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    GradientAccumulationScheduler,
    LearningRateFinder,
    OnExceptionCheckpoint,
)
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dplightning.strategies.base as strategy_base
from dplightning.errors import DPLightningError
from dplightning.privacy.clipping import clip_factors, clip_to_grid_and_sum, per_example_norms
from dplightning.privacy.discretization import from_grid, l2_grid, to_grid
from dplightning.privacy.noise_addition import NoiseSource
from dplightning.privacy.per_example_grads import PerExampleGradients
from dplightning.strategies import DDPDPSGDStrategy, DPSGDStrategy, DPZOStrategy
from dplightning.strategies.checkpointing import resume_position


# --------------------------------------------------------------------------------------- low-bit attack
def _float32_residual(x: float) -> float:
    """Distance of a float64 from the nearest float32: ~0 when x is float32 noise, up to half its ulp if not."""
    return abs(x - float(np.float32(x)))


def _grid_residual(x: float, grid: float) -> float:
    return abs(x / grid - round(x / grid))


def low_bit_guess(release: float, without: float, with_: float, grid: float | None = None) -> int:
    """Guess whether the release was computed from the sum ``with_`` (1) or ``without`` (0), from the low bits:
    the true sum leaves a remainder that looks like the noise's own representation (float32, or the grid). On a
    tie (nothing in the low bits), fall back to the likelihood: the nearer sum."""
    r0, r1 = _float32_residual(release - without), _float32_residual(release - with_)
    if grid is not None:
        r0 += _grid_residual(release - without, grid)
        r1 += _grid_residual(release - with_, grid)
    if r0 == r1:
        return int(abs(release - with_) < abs(release - without))
    return int(r1 < r0)


def _float_noise_release(total: float, std: float, gen: torch.Generator) -> float:
    """The release as it was: a float64 sum plus float32-precision Gaussian noise."""
    return total + float((torch.randn(1, generator=gen) * std).double())


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_low_bit_distinguisher_is_at_chance_on_the_dpzo_release(noise: str) -> None:
    c, sigma, trials = 1.0, 20.0, 1000
    strategy = DPZOStrategy(noise=noise, noise_multiplier=sigma, max_loss_diff=c, device="cpu")
    strategy.noise_source.generator.manual_seed(1)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    old_correct = new_correct = 0
    for _ in range(trials):
        scalars = torch.from_numpy(rng.uniform(-c, c, 9))  # 8 others + the target example
        member = int(rng.integers(2))
        # The float mechanism: the distinguisher must work on it, or this test could not fail.
        without, with_ = float(scalars[:8].sum()), float(scalars.sum())
        old = _float_noise_release(with_ if member else without, sigma * c, gen)
        old_correct += low_bit_guess(old, without, with_) == member
        # The grid mechanism: the attacker knows both candidate sums exactly, in grid units.
        u0, u1 = to_grid(scalars[:8], strategy.grid).sum(), to_grid(scalars, strategy.grid).sum()
        release = float(strategy.privatize((u1 if member else u0).reshape(1))[0])
        assert _grid_residual(release, strategy.grid) == 0.0  # every release is a multiple of the grid
        g0, g1 = float(u0) * strategy.grid, float(u1) * strategy.grid
        new_correct += low_bit_guess(release, g0, g1, strategy.grid) == member
    assert old_correct / trials >= 0.75
    assert new_correct / trials <= 0.56


def test_lmo_release_is_on_the_grid() -> None:
    from dplightning.privacy.mechanisms import LMOMechanism

    strategy = DPZOStrategy(noise="lmo", lmo=LMOMechanism.laplace(1.0), noise_multiplier=2.0, device="cpu")
    releases = torch.cat([strategy.privatize(torch.tensor([0.123456789])) for _ in range(200)])
    units = releases / strategy.grid
    assert torch.equal(units, torch.round(units))


@pytest.mark.parametrize("sigma", [0.4, 300.0, 1e6])
def test_discrete_gaussian_has_the_continuous_law(sigma: float) -> None:
    draws = NoiseSource(seed=0).discrete_gaussian((20000,), sigma)
    assert draws.dtype == torch.int64
    x = draws.double().numpy()
    if sigma < 1:  # far from continuous: compare with the exact probability masses
        k = np.arange(-6, 7)
        pmf = np.exp(-(k**2) / (2 * sigma**2))
        pmf /= pmf.sum()
        observed = np.array([(x == v).sum() for v in k])
        keep = pmf * len(x) > 5
        expected = pmf[keep] / pmf[keep].sum() * observed[keep].sum()
        assert stats.chisquare(observed[keep], expected).pvalue > 1e-3
        return
    assert x.std() == pytest.approx(sigma, rel=0.03)
    assert stats.kstest(x / sigma, "norm").pvalue > 1e-3
    assert stats.kstest(x / (1.1 * sigma), "norm").pvalue < 1e-3  # the test can tell the scale


def test_discrete_laplace_has_the_continuous_law() -> None:
    draws = NoiseSource(seed=0).discrete_laplace((20000,), 1e5).double().numpy()
    assert stats.kstest(draws / 1e5, "laplace").pvalue > 1e-3
    assert abs(draws).mean() == pytest.approx(1e5, rel=0.03)


@pytest.mark.parametrize(("sigma", "q", "units"), [(1.0, 0.01, 16), (0.8, 0.1, 8)])
def test_discrete_gaussian_pld_matches_the_accounted_gaussian(sigma: float, q: float, units: int) -> None:
    """The accountant charges the continuous Gaussian of multiplier σ; the release is the discrete Gaussian of
    std σ·(C/γ) with integer sensitivity C/γ. dp_accounting's own discrete-Gaussian PLD agrees (to its
    discretisation): a wrong unit conversion (σ vs σ·C/γ) would not."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    interval = 1e-4
    ours = (
        pld.from_gaussian_mechanism(
            sigma, sampling_prob=q, value_discretization_interval=interval, use_connect_dots=False
        )
        .self_compose(50)
        .get_epsilon_for_delta(1e-5)
    )
    discrete = pld.from_discrete_gaussian_mechanism(
        sigma * units, sensitivity=units, sampling_prob=q, value_discretization_interval=interval
    )
    eps = discrete.self_compose(50).get_epsilon_for_delta(1e-5)
    assert eps <= ours + 5e-4
    assert eps == pytest.approx(ours, rel=2e-3)


# -------------------------------------------------------------------------------- sensitivity, any precision
class _Aligned(nn.Module):
    """Every example's gradient points the same way: the worst case for summation error."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).sum(-1)


def _clipped_sum(
    model: _Aligned, x: torch.Tensor, dtype: torch.dtype | None, exact: bool, c: float
) -> torch.Tensor:
    engine = PerExampleGradients(model, "sum")
    try:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(x).sum()
        loss.backward()
        grads = engine.pop()
    finally:
        engine.remove()
    groups = {"all": ["fc.weight"]}
    if exact:
        summed, _ = clipped_sums(grads, groups, {"all": c})
        return summed["fc.weight"]
    # The float path the grid replaced: norms, clip factors and the weighted sum in the gradients' precision.
    factors = clip_factors(per_example_norms(grads, groups)["all"], c)
    return torch.einsum("b,b...->...", factors.to(grads["fc.weight"].dtype), grads["fc.weight"]).double()


@pytest.mark.parametrize("precision", [torch.bfloat16, None])
def test_removing_one_of_1024_aligned_examples_moves_the_sum_by_at_most_c(
    precision: torch.dtype | None,
) -> None:
    torch.manual_seed(0)
    model, c = _Aligned(), 1.0
    x = torch.randn(1, 64).expand(1024, 64).clone() * 3.0 + 0.01 * torch.randn(1024, 64)
    full = _clipped_sum(model, x, precision, True, c)
    model.zero_grad()
    without = _clipped_sum(model, x[1:], precision, True, c)
    assert float((full - without).norm()) <= c * (1 + 1e-9)
    assert float(full.norm()) <= 1024 * c * (1 + 1e-9)


class _PerExampleGrads(pl.Callback):
    """Keeps the per-example gradients each backward hands to the clipping (a spy on the strategy)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        original = strategy._add_clipped  # type: ignore[attr-defined]

        def spy(grads: dict[str, torch.Tensor]) -> None:
            self.grads.append({k: v.detach().clone() for k, v in grads.items()})
            original(grads)

        strategy._add_clipped = spy  # type: ignore[attr-defined]


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
@pytest.mark.parametrize("removed", ["longest", "only_short"])
def test_one_record_leaves_the_other_examples_gradients_bit_for_bit(precision: str, removed: str) -> None:
    """Sensitivity C needs the other examples' contributions to be the same with or without a record. Three
    things broke that: backpropagating the mean's 1/B (the scale of the whole backward pass followed the batch
    size), padding to the batch's longest note (attention over a width set by the other notes), and padding to
    exactly max_length (a batch of truncated notes has an all-ones mask, which Hugging Face turns into another
    attention path than the same batch with one short note). Each moved the others' gradients in their low bits:
    a few % of C in bf16, ~1e-6 in fp32."""
    from dplightning.data.collate import CausalLMCollator
    from dplightning.module import DPLoRAModule

    gen = torch.Generator().manual_seed(0)
    if removed == "longest":
        lengths, last = torch.randint(8, 24, (15,)).tolist(), 40  # the last note sets the width
    else:
        lengths, last = [60] * 15, 10  # all truncated to max_length but the last
    notes = [{"input_ids": torch.randint(5, 200, (n,), generator=gen)} for n in [*lengths, last]]

    def per_example(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        spy = _PerExampleGrads()
        model = DPLoRAModule(model_name="tiny-llama", lora_rank=2, seed=0, optimizer="sgd")
        with torch.no_grad():  # B = 0 at init would leave A's gradients zero
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        strategy = DPSGDStrategy(noise_multiplier=1.0, poisson_sampling=False, seed=0, device="cpu")
        loader = DataLoader(items, batch_size=len(items), collate_fn=CausalLMCollator(0, 48))  # type: ignore[arg-type]
        trainer = quiet_trainer(strategy, [spy], max_steps=1, precision=precision)
        with pytest.warns(UserWarning, match="approximate"):
            trainer.fit(model, loader)
        (grads,) = spy.grads
        return grads

    with_it, without = per_example(notes), per_example(notes[:-1])
    assert with_it.keys() == without.keys() and without
    for name in without:
        assert torch.equal(with_it[name][:-1], without[name]), name


class _Widths(pl.Callback):
    def __init__(self) -> None:
        self.widths: set[int] = set()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch["input_ids"].shape[0]:
            self.widths.add(int(batch["input_ids"].shape[1]))


def test_poisson_batches_of_notes_have_one_fixed_width_with_a_padding_column() -> None:
    from dplightning.data.collate import CausalLMCollator
    from dplightning.module import DPLoRAModule

    gen = torch.Generator().manual_seed(0)
    notes = [
        {"input_ids": torch.randint(5, 200, (int(n),), generator=gen)} for n in torch.randint(4, 60, (64,))
    ]
    widths = _Widths()
    trainer = quiet_trainer(DPSGDStrategy(noise_multiplier=1.0, seed=0, device="cpu"), [widths], max_steps=4)
    loader = DataLoader(notes, batch_size=8, collate_fn=CausalLMCollator(0, 48))  # type: ignore[arg-type]
    trainer.fit(DPLoRAModule(model_name="tiny-llama", lora_rank=2, seed=0), loader)
    assert widths.widths == {49}  # max_length + 1, whatever the drawn notes


@pytest.mark.parametrize("poisson", [True, False])
def test_a_fixed_width_beyond_the_models_positions_is_one_clear_error(poisson: bool) -> None:
    from dplightning.data.collate import CausalLMCollator
    from dplightning.models import TINY_MAX_POSITIONS
    from dplightning.module import DPLoRAModule

    notes = [{"input_ids": torch.arange(5, 15)} for _ in range(16)]
    strategy = DPSGDStrategy(noise_multiplier=1.0, seed=0, device="cpu", poisson_sampling=poisson)
    loader = DataLoader(notes, batch_size=8, collate_fn=CausalLMCollator(0, TINY_MAX_POSITIONS))  # type: ignore[arg-type]
    with pytest.raises(
        DPLightningError,
        match=rf"max_length \+ 1 = {TINY_MAX_POSITIONS + 1}.*at most {TINY_MAX_POSITIONS - 1}",
    ):
        quiet_trainer(strategy, max_steps=1).fit(
            DPLoRAModule(model_name="tiny-gpt2", lora_rank=2, seed=0), loader
        )


def test_float_clip_and_sum_in_bf16_breaks_the_bound() -> None:
    """The float path this replaces: in bf16 the same pair of sums differs by far more than C."""
    torch.manual_seed(0)
    model, c = _Aligned(), 1.0
    x = torch.randn(1, 64).expand(1024, 64).clone() * 3.0 + 0.01 * torch.randn(1024, 64)
    full = _clipped_sum(model, x, torch.bfloat16, False, c)
    model.zero_grad()
    without = _clipped_sum(model, x[1:], torch.bfloat16, False, c)
    assert float((full - without).norm()) > c * (1 + 1e-3)


def test_grid_rounding_keeps_the_norm_within_c() -> None:
    gen = torch.Generator().manual_seed(0)
    d, c = 4096, 0.7
    grid = l2_grid(c, d)
    grads = {"w": torch.randn(256, d, generator=gen, dtype=torch.float64) * 5}
    units, _ = clip_to_grid_and_sum(grads, {"all": ["w"]}, {"all": c}, {"all": grid})
    for i in range(0, 256, 17):  # each example alone
        one, _ = clip_to_grid_and_sum({"w": grads["w"][i : i + 1]}, {"all": ["w"]}, {"all": c}, {"all": grid})
        assert float(from_grid(one["w"], grid).norm()) <= c
    assert units["w"].dtype == torch.int64


# -------------------------------------------------------------------------------------- non-finite record
class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.fc(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(
    strategy: Any, data: TensorDataset, batch_size: int, callbacks: list[pl.Callback] | None = None, **kw: Any
) -> pl.Trainer:
    kw.setdefault("max_steps", 1)
    model = kw.pop("model", None) or _Linear()
    trainer = quiet_trainer(strategy, callbacks, **kw)
    trainer.fit(model, DataLoader(data, batch_size=batch_size))
    return trainer


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_one_non_finite_record_contributes_nothing_and_raises_nothing(bad: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen)
    poisoned = x.clone()
    poisoned[3] = bad
    grads = {}
    for name, inputs in (("clean", x), ("poisoned", poisoned)):
        recorder = GradRecorder()
        strategy = DPSGDStrategy(
            noise_multiplier=0.0, max_grad_norm=0.5, device="cpu"
        )  # q = 1: every example
        _fit(strategy, TensorDataset(inputs, y), 16, [recorder])
        grads[name] = recorder.grads[0]
    for n, g in grads["poisoned"].items():
        assert torch.isfinite(g).all(), n
    # Without the record: the clean sum minus its clipped contribution (recomputed alone).
    recorder = GradRecorder()
    _fit(
        DPSGDStrategy(noise_multiplier=0.0, max_grad_norm=0.5, device="cpu"),
        TensorDataset(x[3:4], y[3:4]),
        1,
        [recorder],
    )
    for n in grads["clean"]:
        expected = grads["clean"][n] * 16 - recorder.grads[0][n]
        torch.testing.assert_close(grads["poisoned"][n] * 16, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- grid on DP-SGD releases
def test_dpsgd_release_is_an_integer_number_of_grid_steps() -> None:
    model = _Linear().double()
    data = TensorDataset(torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 2, (32,)))
    recorder = GradRecorder()
    strategy = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, device="cpu")
    trainer = pl.Trainer(
        strategy=strategy,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=2,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    (grid,) = strategy.grids().values()
    for step in recorder.grads:
        for g in step.values():
            units = g * strategy.expected_batch_size / grid
            assert torch.allclose(units, torch.round(units), rtol=0, atol=1e-3)
            assert (units.abs() > 1e3).all()  # noise of σ·C/γ grid units: not trivially integral


# ----------------------------------------------------------------------------------- predictable randomness
def test_seeded_noise_warns_once_that_the_seed_must_stay_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(strategy_base, "_warned_seeded", False)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    with pytest.warns(UserWarning, match="seed is secret"):
        _fit(DPSGDStrategy(noise_multiplier=1.0, seed=0, device="cpu"), data, 8)
    import warnings

    monkeypatch.setattr(strategy_base, "_warned_seeded", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(DPSGDStrategy(noise_multiplier=1.0, device="cpu"), data, 8)  # no seed: the CSPRNG, no warning
    assert not [w for w in caught if "seed is secret" in str(w.message)]


def test_seeded_noise_without_a_seed_is_refused() -> None:
    with pytest.raises(DPLightningError, match="secure_rng=False needs a seed"):
        DPSGDStrategy(noise_multiplier=1.0, secure_rng=False)


@pytest.mark.parametrize("strategy_cls", [DPSGDStrategy, DPZOStrategy, DDPDPSGDStrategy])
def test_without_a_seed_noise_and_batches_come_from_the_csprng(strategy_cls: type) -> None:
    """The default must not be a public constant seed, from which anyone could replay every noise draw."""
    default = strategy_cls(noise_multiplier=1.0)
    assert default.secure_rng and default.noise_source.secure
    draws = [strategy_cls(noise_multiplier=1.0).noise_source.discrete_gaussian((64,), 1e6) for _ in range(2)]
    assert not torch.equal(*draws)
    seeded = [strategy_cls(noise_multiplier=1.0, seed=7) for _ in range(2)]  # a seed: reproducible
    assert not seeded[0].secure_rng
    assert torch.equal(*(s.noise_source.discrete_gaussian((64,), 1e6) for s in seeded))
    assert strategy_cls(noise_multiplier=1.0, seed=7, secure_rng=True).noise_source.secure


def test_secure_noise_is_not_downgraded_by_a_seeded_checkpoint() -> None:
    seeded = DPSGDStrategy(noise_multiplier=1.0, seed=3, device="cpu")
    secure = DPSGDStrategy(noise_multiplier=1.0, secure_rng=True, device="cpu")
    secure._apply_dp_state(seeded.dp_state_dict())
    assert secure.secure_rng and secure.noise_source.secure
    a = secure.noise_source.discrete_gaussian((64,), 1e6)
    b = NoiseSource(seed=3).discrete_gaussian((64,), 1e6)
    assert not torch.equal(a, b)


def test_secure_noise_source_ignores_the_seed() -> None:
    a = NoiseSource(seed=0, secure=True).discrete_gaussian((32,), 1e3)
    b = NoiseSource(seed=0, secure=True).discrete_gaussian((32,), 1e3)
    assert not torch.equal(a, b)
    c = NoiseSource(seed=0).discrete_gaussian((32,), 1e3)
    assert torch.equal(c, NoiseSource(seed=0).discrete_gaussian((32,), 1e3))


def test_poisson_masks_follow_secure_rng() -> None:
    from dplightning.privacy.batch_selection import PoissonBatchSampler

    seeded = [PoissonBatchSampler(1000, 0.1, seed=0).logical_batch(0) for _ in range(2)]
    assert np.array_equal(*seeded)
    secure = [PoissonBatchSampler(1000, 0.1, seed=0, secure_rng=True).logical_batch(0) for _ in range(2)]
    assert not np.array_equal(*secure)


# --------------------------------------------------------------------------------------- loop settings
def test_partial_accumulation_is_refused() -> None:
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    with pytest.raises(DPLightningError, match="multiple of 2"):
        _fit(
            DPSGDStrategy(noise_multiplier=1.0, device="cpu"),
            data,
            4,
            accumulate_grad_batches=2,
            limit_train_batches=3,
            max_steps=4,
        )


class _Quadratic(_Linear):
    def per_example_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.fc(x), y, reduction="none")


def test_partial_accumulation_is_refused_for_dpzo() -> None:
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    with pytest.raises(DPLightningError, match="multiple of 2"):
        _fit(
            DPZOStrategy(noise_multiplier=1.0, trainable="all", device="cpu"),
            data,
            4,
            accumulate_grad_batches=2,
            limit_train_batches=3,
            max_steps=4,
            model=_Quadratic(),
        )


def _private(kind: str) -> Any:
    if kind == "dpsgd":
        return DPSGDStrategy(noise_multiplier=1.0, device="cpu"), _Linear()
    return DPZOStrategy(noise_multiplier=1.0, trainable="all", device="cpu"), _Quadratic()


class _OwnFinder(LearningRateFinder):
    """A subclass is refused as its parent is."""


class _TunableLinear(_Quadratic):
    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 4

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), batch_size=self.batch_size
        )


@pytest.mark.parametrize("kind", ["dpsgd", "dpzo"])
@pytest.mark.parametrize(
    ("callback", "why"),
    [
        (lambda: GradientAccumulationScheduler({0: 2}), "accumulate_grad_batches"),
        (lambda: LearningRateFinder(num_training_steps=3), "raw loss"),
        (lambda: _OwnFinder(num_training_steps=3), "raw loss"),
        (lambda: BatchSizeFinder(steps_per_trial=2, max_trials=2), "batch size"),
    ],
    ids=["accumulation_scheduler", "lr_finder", "lr_finder_subclass", "batch_size_finder"],
)
def test_callbacks_that_break_the_accounting_are_refused(kind: str, callback: Any, why: str) -> None:
    # The scheduler sums several Poisson batches into one release; the finders choose from private batches and
    # spend the budget on their trials.
    strategy, _ = _private(kind)
    tunable = _TunableLinear()
    trainer = pl.Trainer(
        strategy=strategy,
        callbacks=[callback()],
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with pytest.raises(DPLightningError, match=why):
        trainer.fit(tunable)
    assert strategy.accountant.steps == 0


class _RaiseAccumulation(pl.Callback):
    """What a scheduler of one's own would do: raise accumulate_grad_batches at the second step."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 1:
            trainer.accumulate_grad_batches = 2


@pytest.mark.parametrize("kind", ["dpsgd", "dpzo"])
def test_accumulation_changed_during_training_stops_before_the_release(kind: str) -> None:
    strategy, model = _private(kind)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    with pytest.raises(DPLightningError, match="changed from 1 to 2"):
        _fit(strategy, data, 4, callbacks=[_RaiseAccumulation()], model=model, max_steps=4)
    assert strategy.accountant.steps == 1  # the first step only: nothing of the mixed one was released


class _SaveAt(pl.Callback):
    def __init__(self, path: str, batch_idx: int) -> None:
        self.path, self.batch_idx = path, batch_idx

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        if idx == self.batch_idx:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


class _Releases(pl.Callback):
    """The record ids (third tensor of the batch) of each release, in order."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.releases: list[list[int]] = []
        self._steps: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, idx: int) -> None:
        if self._steps is None:
            self._steps = trainer.strategy.accountant.steps
        self.pending += batch[2].tolist()

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.strategy.accountant.steps != self._steps:
            self.releases.append(sorted(self.pending))
            self.pending, self._steps = [], trainer.strategy.accountant.steps


class _LinearWithIds(_Linear):
    """Batches carry the record ids as a third tensor, so releases can be traced to Poisson batches."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        return nn.functional.cross_entropy(self.fc(x), y)

    def per_example_loss(self, batch: Any) -> torch.Tensor:  # what DP-ZO evaluates
        x, y, _ = batch
        return nn.functional.cross_entropy(self.fc(x), y, reduction="none")


def _with_ids(n: int = 64) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 4, generator=gen), torch.randint(0, 2, (n,), generator=gen), torch.arange(n)
    )


class _Crash(Exception):
    pass


class _CrashAt(pl.Callback):
    """Raises in ``hook`` at micro-batch ``batch_idx``; Lightning's OnExceptionCheckpoint then saves."""

    def __init__(self, hook: str, batch_idx: int) -> None:
        self.hook, self.batch_idx = hook, batch_idx

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, idx: int) -> None:
        if self.hook == "on_train_batch_start" and idx == self.batch_idx:
            raise _Crash

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        # DP-SGD has released and charged the step here, and its update is not applied yet
        idx = trainer.fit_loop.epoch_loop.batch_idx
        if self.hook == "on_before_optimizer_step" and idx == self.batch_idx:
            raise _Crash


def _seeded(kind: str) -> Any:
    if kind == "dpsgd":
        return DPSGDStrategy(noise_multiplier=1.0, seed=5, device="cpu"), _LinearWithIds()
    return DPZOStrategy(noise_multiplier=1.0, seed=5, trainable="all", device="cpu"), _LinearWithIds()


@pytest.mark.parametrize("kind", ["dpsgd", "dpzo"])
@pytest.mark.parametrize(
    ("how", "batch_idx"),
    [
        ("on_train_batch_end", 2),
        ("on_train_batch_end", 3),
        ("on_train_batch_start", 2),
        ("on_train_batch_start", 3),
        ("on_before_optimizer_step", 3),
        ("on_train_batch_start", 15),  # the epoch's last micro-batch
        ("on_before_optimizer_step", 15),
    ],
)
def test_a_checkpoint_inside_an_accumulation_window_resumes_at_a_step(
    tmp_path: Any, kind: str, how: str, batch_idx: int
) -> None:
    # k = 2: batch_idx 2 and 3 are the chunks of the second step's Poisson batch. Resumed where the loop stood,
    # every later release would hold the last chunk of one Poisson batch and the first of the next: checkpoints
    # are written as of a step (the window's start, or its end once its release was made and charged).
    data = _with_ids()
    kw: dict[str, Any] = {"accumulate_grad_batches": 2, "max_steps": 10}  # 8 steps an epoch
    first, model = _seeded(kind)
    if how == "on_train_batch_end":
        path = str(tmp_path / "mid.ckpt")
        _fit(first, data, 4, callbacks=[_SaveAt(path, batch_idx)], model=model, **kw)
    else:
        path = str(tmp_path / "exc.ckpt")
        crash = [_CrashAt(how, batch_idx), OnExceptionCheckpoint(str(tmp_path), "exc")]
        with pytest.raises(_Crash):
            _fit(
                first,
                data,
                4,
                callbacks=crash,
                model=model,
                enable_checkpointing=True,
                default_root_dir=tmp_path,
                **kw,
            )
    released, applied = first.accountant.steps, torch.load(path, weights_only=False)["global_step"]
    strategy, model = _seeded(kind)
    spy = _Releases()
    quiet_trainer(strategy, [spy], **kw).fit(model, DataLoader(data, batch_size=4), ckpt_path=path)
    sampler = strategy._sampler
    assert sampler is not None
    expected = []
    for step in range(released, released + 10 - applied):
        sampler.epoch = step // sampler.num_batches
        expected.append(sorted(sampler.logical_batch(step % sampler.num_batches).tolist()))
    # each release is the next Poisson batch, none drawn twice; a released step is charged once
    assert spy.releases == expected
    assert strategy.accountant.steps == released + 10 - applied


def test_a_step_left_unapplied_by_an_earlier_fit_does_not_move_a_later_checkpoint(tmp_path: Any) -> None:
    # The flag of an exception between a release and its update must not outlive that fit: here it would write
    # the window's end, and a resume would skip a Poisson batch never released.
    data, path = _with_ids(), str(tmp_path / "mid.ckpt")
    strategy, model = _seeded("dpsgd")
    strategy._release_unapplied = True
    # saved at the first micro-batch, before this fit's first step could clear the flag
    _fit(strategy, data, 4, callbacks=[_SaveAt(path, 0)], model=model, accumulate_grad_batches=2, max_steps=4)
    progress = torch.load(path, weights_only=False)["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert resume_position(progress["current"]) == 0


def test_validation_inside_accumulation_windows_warns() -> None:
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    trainer = quiet_trainer(
        DPSGDStrategy(noise_multiplier=1.0, device="cpu"), accumulate_grad_batches=2, val_check_interval=3
    )
    with pytest.warns(UserWarning, match="multiple of 2"):
        trainer.fit(_Validated(), DataLoader(data, batch_size=4), loader)


class _Validated(_Linear):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.fc(x), y))


def test_a_mid_window_checkpoint_of_an_older_version_is_refused(tmp_path: Any) -> None:
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    path = str(tmp_path / "mid.ckpt")
    kw: dict[str, Any] = {"accumulate_grad_batches": 2, "max_steps": 4}
    _fit(DPSGDStrategy(noise_multiplier=1.0, device="cpu"), data, 4, callbacks=[_SaveAt(path, 1)], **kw)
    checkpoint = torch.load(path, weights_only=False)
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    for scope in ("current", "total"):  # as an older version wrote it one micro-batch into the next window
        for key in ("ready", "started", "processed", "completed"):
            progress[scope][key] += 1
    torch.save(checkpoint, path)
    strategy = DPSGDStrategy(noise_multiplier=1.0, device="cpu")
    with pytest.raises(DPLightningError, match="inside an accumulation window of 2"):
        quiet_trainer(strategy, **kw).fit(_Linear(), DataLoader(data, batch_size=4), ckpt_path=path)
    assert strategy.accountant.steps == 1


def test_a_mid_epoch_resume_with_another_accumulation_is_refused(tmp_path: Any) -> None:
    data, path = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), str(tmp_path / "k1.ckpt")
    _fit(
        DPSGDStrategy(noise_multiplier=1.0, device="cpu"), data, 4, callbacks=[_SaveAt(path, 4)], max_steps=8
    )
    strategy = DPSGDStrategy(noise_multiplier=1.0, device="cpu")
    trainer = quiet_trainer(strategy, max_steps=8, accumulate_grad_batches=2)
    with pytest.raises(DPLightningError, match="accumulate_grad_batches=1, and this run has 2"):
        trainer.fit(_Linear(), DataLoader(data, batch_size=4), ckpt_path=path)


class _BatchesPerEpoch(pl.Callback):
    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.counts[trainer.current_epoch] = self.counts.get(trainer.current_epoch, 0) + 1


def test_loaders_reloaded_every_epoch_start_each_epoch_at_its_first_batch() -> None:
    # The reload sees the finished epoch's batch count: taken as a resume's, it skipped every other epoch.
    data, counter = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), _BatchesPerEpoch()
    strategy = DPSGDStrategy(noise_multiplier=1.0, device="cpu")
    _fit(
        strategy,
        data,
        8,
        callbacks=[counter],
        max_steps=-1,
        max_epochs=3,
        reload_dataloaders_every_n_epochs=1,
    )
    assert counter.counts == {0: 8, 1: 8, 2: 8}
    assert strategy.accountant.steps == 24


class _Outputs(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("kind", ["dpsgd", "dpzo"])
def test_callbacks_get_no_private_loss_from_the_training_step(kind: str) -> None:
    # Lightning passes training_step's return value to every callback; the raw loss of a private batch is not
    # covered by ε. Its gradient still trains the model (the other tests here check it bit for bit).
    strategy, model = _private(kind)
    data = TensorDataset(torch.randn(64, 4) * 10, torch.randint(0, 2, (64,)))
    spy = _Outputs()
    before = [p.detach().clone() for p in model.parameters()]
    _fit(strategy, data, 16, callbacks=[spy], model=model, max_steps=3)
    assert spy.losses == [0.0, 0.0, 0.0]
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_value_free_loss_trains_bit_for_bit_as_the_loss(
    monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    import dplightning.strategies.dpsgd as dpsgd

    data = TensorDataset(torch.randn(64, 4) * 3, torch.randint(0, 2, (64,)))

    def weights() -> list[torch.Tensor]:
        model = _Linear()
        strategy = DPSGDStrategy(noise_multiplier=1.0, seed=3, device="cpu")
        _fit(strategy, data, 16, model=model, max_steps=3, precision=precision, accumulate_grad_batches=2)
        return [p.detach().clone() for p in model.parameters()]

    value_free = weights()
    monkeypatch.setattr(dpsgd._ValueFree, "apply", lambda loss: loss)
    assert all(torch.equal(a, b) for a, b in zip(value_free, weights()))


def test_several_training_dataloaders_are_refused() -> None:
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    trainer = pl.Trainer(
        strategy=DPSGDStrategy(noise_multiplier=1.0, device="cpu"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=2,
    )
    with pytest.raises(DPLightningError, match="one training dataloader"):
        trainer.fit(_Linear(), [DataLoader(data, batch_size=8), DataLoader(data, batch_size=4)])


def test_a_refused_step_clears_the_stored_per_example_norms() -> None:
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    strategy = DPSGDStrategy(noise_multiplier=1.0, device="cpu")
    probe = DPSGDStrategy(noise_multiplier=1.0, device="cpu")
    from dplightning.privacy.accounting import StepEvent

    probe.accountant.record(StepEvent(1.0, 8 / 64))
    strategy.max_epsilon = probe.epsilon() * 1.001  # one step fits, the second does not
    trainer = _fit(strategy, data, 8, max_steps=3)
    assert strategy.budget_exhausted and strategy.accountant.steps == 1
    assert strategy.private_step_norms == {}
    assert trainer.global_step <= 2


# ----------------------------------------------------------------------------------- per-token clipping
class _FlattensTokens(_Linear):
    """Feeds ``[B·S, d]`` to its layer: per-row gradients would be per token, not per example."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        tokens = x.reshape(-1, 2, 4).reshape(-1, 4)  # each example is two "tokens"
        return nn.functional.cross_entropy(self.fc(tokens), y.repeat_interleave(2))


def test_a_model_that_flattens_examples_is_refused() -> None:
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
    with pytest.raises(DPLightningError, match="first dimension"):
        _fit(DPSGDStrategy(noise_multiplier=1.0, device="cpu"), data, 8, model=_FlattensTokens())


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_dpsgd_trains_under_either_precision_with_grid_releases(precision: str) -> None:
    model = _Linear()
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    recorder = GradRecorder()
    strategy = DPSGDStrategy(noise_multiplier=0.0, max_grad_norm=0.1, device="cpu")
    _fit(strategy, data, 64, [recorder], precision=precision, model=model)
    grad = recorder.grads[0]["fc.weight"]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # every example is clipped (C is small): the sum of 64 clipped gradients has norm ≤ 64·C
    assert float(grad.norm()) * 64 <= 64 * 0.1 * (1 + 1e-6)


@pytest.mark.parametrize("opt_in", [False, True])
def test_dpzo_logs_the_private_loss_only_when_opted_in(opt_in: bool) -> None:
    from dplightning.module import DPLoRAModule

    model = DPLoRAModule(model_name="tiny-llama", log_private_loss=opt_in)
    ids = torch.randint(0, 100, (32, 8))

    class Listed(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "labels": ids[i], "attention_mask": torch.ones(8)}

    trainer = pl.Trainer(
        strategy=DPZOStrategy(noise_multiplier=1.0, mu=1e-2, device="cpu"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=2,
    )
    trainer.fit(model, DataLoader(Listed(), batch_size=8))
    assert ("train/loss" in trainer.callback_metrics) == opt_in


# ------------------------------------------------------------------------- large noise scales (exact sampler)
@pytest.mark.parametrize("bits", [52, 54, 55.9])
def test_large_discrete_noise_keeps_its_low_bits_random(bits: float) -> None:
    """Float geometric draws at these scales are all even (2^53 and up): a release's parity would be the sum's."""
    draws = NoiseSource(seed=0).discrete_laplace((20000,), 2.0**bits)
    assert abs(float((draws % 2 != 0).double().mean()) - 0.5) < 0.02
    assert abs(float((draws % 4 == 3).double().mean()) - 0.25) < 0.02
    assert stats.kstest(draws.double().numpy() / 2.0**bits, "laplace").pvalue > 1e-3
    gauss = NoiseSource(seed=1).discrete_gaussian((20000,), 2.0**bits / 64)
    assert abs(float((gauss % 2 != 0).double().mean()) - 0.5) < 0.02


@pytest.mark.parametrize("scale", [0.7, 1e5, 2.0**30 - 1, 2.0**30, 2.0**30 + 1, 2.0**47.3])
def test_one_scale_fast_path_draws_exactly_what_the_per_entry_path_draws(scale: float) -> None:
    """The discrete Gaussian's proposals take a scalar-scale path: same law, same random draws, same integers."""
    n = 5003
    fast = NoiseSource(seed=4)._discrete_laplace_scalar(n, scale)
    per_entry = NoiseSource(seed=4).discrete_laplace((n,), torch.full((n,), scale, dtype=torch.float64))
    assert torch.equal(fast, per_entry)


def test_noise_beyond_int64_is_refused_or_added_exactly() -> None:
    source = NoiseSource(seed=0)
    with pytest.raises(ValueError, match="int64"):
        source.discrete_laplace((4,), 2.0**60)
    units = torch.full((2000,), 12345, dtype=torch.int64)
    released = source.add_discrete_laplace(units, 2.0**70)
    assert torch.isfinite(released).all()
    # A wrapped cast would give the same extreme value (sum - 2^63) again and again.
    assert released.unique().numel() == 2000
    assert stats.kstest(released.numpy() / 2.0**70, "laplace").pvalue > 1e-3


def test_lmo_with_a_mixing_variable_near_zero_never_wraps() -> None:
    from dplightning.privacy.mechanisms import LMOMechanism

    heavy = LMOMechanism(a1=1.0, a3=0.0, a4=0.0, gamma_shape=0.3, gamma_scale=1.0)
    released = NoiseSource(seed=0).add_discrete_lmo(torch.zeros(20000, dtype=torch.int64), heavy, 2.0**40)
    assert torch.isfinite(released).all()
    assert (released.abs() != 2.0**63).all()


def test_automatic_clipping_with_underflowing_norms_stays_within_c() -> None:
    """Squares of float64 gradients near 1e-160 underflow: the computed norm is too small and C/(‖g‖+γ) with a
    tiny γ over-scales. The integer re-check drops such an example instead of releasing it."""
    c, grid = 1e-8, l2_grid(1e-8, 64)
    grads = {"w": torch.full((3, 64), 1e-300, dtype=torch.float64)}
    grads["w"][1] = torch.randn(64, dtype=torch.float64) * 1e-300
    units, _ = clip_to_grid_and_sum(grads, {"all": ["w"]}, {"all": c}, {"all": grid}, stability=1e-300)
    assert float(from_grid(units["w"], grid).norm()) <= 3 * c
    for i in range(3):
        one, _ = clip_to_grid_and_sum(
            {"w": grads["w"][i : i + 1]}, {"all": ["w"]}, {"all": c}, {"all": grid}, stability=1e-300
        )
        assert float(from_grid(one["w"], grid).norm()) <= c


def test_hooks_between_backward_and_release_never_see_the_raw_batch_gradient() -> None:
    seen: list[Any] = []

    class Spy(pl.Callback):
        def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.append(pl_module.fc.weight.grad)

    data = TensorDataset(torch.randn(32, 4) * 100, torch.randint(0, 2, (32,)))
    recorder = GradRecorder()
    _fit(DPSGDStrategy(noise_multiplier=0.0, max_grad_norm=0.1, device="cpu"), data, 32, [Spy(), recorder])
    assert seen and all(g is None for g in seen)
    assert float(recorder.grads[0]["fc.weight"].norm()) <= 0.1  # the optimizer still gets the release


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_nan_or_infinite_privacy_settings_are_refused(bad: float) -> None:
    with pytest.raises(DPLightningError):
        DPSGDStrategy(noise_multiplier=bad, device="cpu")
    with pytest.raises(DPLightningError):
        DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=bad, device="cpu")
    strategy = DPSGDStrategy(noise_multiplier=1.0, device="cpu")
    strategy.groups = {"all": ["w"]}
    strategy.clip_thresholds = {"all": 1.0}
    with pytest.raises(DPLightningError):
        strategy.set_clip_thresholds(bad)
    with pytest.raises(DPLightningError):
        strategy.set_noise_multipliers({"all": bad if bad != -1.0 else -2.0})
    with pytest.raises(DPLightningError):
        strategy.set_noise_multiplier(bad)


def test_dpzo_lmo_with_a_heavy_mixture_releases_finite_values_on_the_grid() -> None:
    from dplightning.privacy.mechanisms import LMOMechanism

    heavy = LMOMechanism(a1=1.0, a3=0.0, a4=0.0, gamma_shape=0.3, gamma_scale=1.0)
    strategy = DPZOStrategy(noise="lmo", lmo=heavy, noise_multiplier=1.0, device="cpu")
    releases = torch.cat([strategy.privatize(torch.tensor([0.25])) for _ in range(3000)])
    assert torch.isfinite(releases).all()


# ------------------------------------------------------------------------------ windows cut short
class _WindowAudit:
    """Checks every release of ``strategy`` against the micro-batches of its own window: the ``k`` consecutive
    batches of the same fit and epoch that end at the release. Contributions are read around the strategy's own
    accumulation call, and the release before noise is added."""

    def __init__(self, strategy: Any, kind: str, k: int) -> None:
        self.strategy, self.kind, self.k = strategy, kind, k
        self.contributions: list[tuple[Any, int, int, dict[str, torch.Tensor]]] = []
        self.checked = 0
        if kind == "dpsgd":
            add, release = strategy._add_clipped, strategy.release_noisy_gradient

            def add_clipped(grads: Any) -> None:
                before = {n: v.clone() for n, v in strategy._summed.items()}
                add(grads)
                self._record({n: v - before.get(n, 0) for n, v in strategy._summed.items()})

            def release_noisy_gradient() -> None:
                self._check({n: v.clone() for n, v in strategy._summed.items()})
                release()

            strategy._add_clipped, strategy.release_noisy_gradient = add_clipped, release_noisy_gradient
        else:
            accumulate, privatize = strategy._accumulate, strategy.privatize

            def accumulate_sums(sums: torch.Tensor) -> None:
                self._record({"sums": sums.clone()})
                accumulate(sums)

            def privatize_sums(sums: torch.Tensor) -> torch.Tensor:
                self._check({"sums": sums.clone()})
                return privatize(sums)

            strategy._accumulate, strategy.privatize = accumulate_sums, privatize_sums

    def _where(self) -> tuple[Any, int, int]:
        trainer = self.strategy._attached_module.trainer
        return trainer, trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx

    def _record(self, contribution: dict[str, torch.Tensor]) -> None:
        self.contributions.append((*self._where(), contribution))

    def _check(self, released: dict[str, torch.Tensor]) -> None:
        trainer, epoch, idx = self._where()
        own = [
            c for t, e, i, c in self.contributions if t is trainer and e == epoch and idx - self.k < i <= idx
        ]
        assert len(own) == self.k
        expected: dict[str, Any] = {}
        for c in own:
            for name, value in c.items():
                expected[name] = expected.get(name, 0) + value
        assert released.keys() == {n for n, v in expected.items() if isinstance(v, torch.Tensor)}
        for name, value in released.items():
            assert torch.equal(value, expected[name]), (
                f"release {self.checked} of {name} is not its window's sum"
            )
        self.checked += 1


class _EndsEpochEarly(_LinearWithIds):
    """Ends epoch 0 at batch 3 (Lightning's -1 from on_train_batch_start): inside the window of batches 2–3."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return -1 if self.current_epoch == 0 and batch_idx == 3 else None


class _StopAt(pl.Callback):
    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.fit_loop.epoch_loop.batch_idx == self.batch_idx:
            trainer.should_stop = True


def _window_strategy(kind: str) -> Any:
    # σ = 0 and no budget: the release is the clipped sum itself, so it can be compared exactly
    if kind == "dpsgd":
        return DPSGDStrategy(noise_multiplier=0.0, device="cpu")
    return DPZOStrategy(noise_multiplier=0.0, trainable="all", device="cpu")


@pytest.mark.parametrize("kind", ["dpsgd", "dpzo"])
def test_an_epoch_ended_inside_a_window_leaves_nothing_to_the_next_release(kind: str) -> None:
    strategy = _window_strategy(kind)
    audit = _WindowAudit(strategy, kind, k=2)
    trainer = quiet_trainer(strategy, max_epochs=2, max_steps=-1, accumulate_grad_batches=2)
    trainer.fit(_EndsEpochEarly(), DataLoader(_with_ids(64), batch_size=4))
    assert audit.checked == 1 + 8  # epoch 0: batches 0–1 only; epoch 1: 16 batches
    assert strategy.accountant.steps == audit.checked


@pytest.mark.parametrize("kind", ["dpsgd", "dpzo"])
def test_a_fit_stopped_inside_a_window_leaves_nothing_to_the_next_fit(kind: str) -> None:
    strategy = _window_strategy(kind)
    audit = _WindowAudit(strategy, kind, k=2)
    first = quiet_trainer(strategy, [_StopAt(2)], max_steps=10, accumulate_grad_batches=2)
    first.fit(_LinearWithIds(), DataLoader(_with_ids(64), batch_size=4))
    assert audit.checked == 1  # batches 0–1 released; batch 2 summed, never released
    second = quiet_trainer(strategy, max_steps=2, accumulate_grad_batches=2)
    second.fit(_LinearWithIds(), DataLoader(_with_ids(64), batch_size=4))
    assert audit.checked == 3


@pytest.mark.parametrize("kind", ["dpsgd", "dpzo"])
def test_a_release_outside_a_full_window_is_refused(kind: str) -> None:
    strategy = _window_strategy(kind)
    enter = strategy._enter_micro_batch

    def counted_six_times() -> None:  # as if five more training steps had run outside the loop
        for _ in range(6):
            enter()

    strategy._enter_micro_batch = counted_six_times
    with pytest.raises(DPLightningError, match="would sum 6 micro-batches"):
        _fit(strategy, _with_ids(64), 4, model=_LinearWithIds())
    assert strategy.accountant.steps == 0


class _LossOfShape(_LinearWithIds):
    def __init__(self, shape: str) -> None:
        super().__init__()
        self.shape = shape

    def per_example_loss(self, batch: Any) -> torch.Tensor:
        losses = super().per_example_loss(batch)
        if self.shape == "per token":  # [B, 3]: as if the loss were left unreduced over positions
            return losses[:, None].expand(-1, 3) / 3
        return losses.mean()  # the batch's mean: one record moves it by up to 2C


@pytest.mark.parametrize("shape", ["per token", "scalar"])
def test_dpzo_refuses_a_loss_that_is_not_one_per_example(shape: str) -> None:
    strategy = DPZOStrategy(noise_multiplier=1.0, trainable="all", device="cpu")
    with pytest.raises(DPLightningError, match="DP-ZO clips one loss per example: return a \\[B\\] tensor"):
        _fit(strategy, _with_ids(64), 4, model=_LossOfShape(shape))
    assert strategy.accountant.steps == 0


def test_dpzo_directions_do_not_derive_from_the_secret_seed() -> None:
    # The directions can be read off two released weight sets (their difference is a multiple of the step's
    # direction): derived from the noise seed, they would be an exact test for a guessed seed.
    def directions(**kw: Any) -> list[int]:
        return DPZOStrategy(noise_multiplier=1.0, num_directions=3, device="cpu", **kw).direction_seeds(7)

    assert directions(seed=5) == directions(seed=6) == directions() == directions(direction_seed=0)
    assert directions(seed=5, direction_seed=1) != directions(seed=5)


class _SkipsRecord(_LinearWithIds):
    """A 'skip this batch' guard that depends on the records: returns None when record 5 is in the batch."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return None if bool((batch[2] == 5).any()) else super().training_step(batch, batch_idx)


def _collate_skipping_record_5(items: list[Any]) -> Any:
    if any(int(item[2]) == 5 for item in items):
        return None
    return torch.utils.data.default_collate(items)


def test_a_batch_skipped_by_training_step_or_collate_is_refused() -> None:
    with pytest.raises(DPLightningError, match="training_step returned None"):
        _fit(
            DPSGDStrategy(noise_multiplier=1.0, device="cpu"),
            _with_ids(64),
            32,
            model=_SkipsRecord(),
            max_steps=8,
        )
    strategy = DPSGDStrategy(noise_multiplier=1.0, device="cpu")
    trainer = quiet_trainer(strategy, max_steps=8)
    loader = DataLoader(_with_ids(64), batch_size=32, collate_fn=_collate_skipping_record_5)
    with pytest.raises(DPLightningError, match="collate function returned None"):
        trainer.fit(_LinearWithIds(), loader)


class _SqueezedLoss(_LinearWithIds):
    def per_example_loss(self, batch: Any) -> torch.Tensor:
        return super().per_example_loss(batch).squeeze()  # a scalar when the batch holds one record


def test_dpzo_takes_a_squeezed_per_example_loss_at_every_batch_size() -> None:
    strategy = DPZOStrategy(noise_multiplier=1.0, trainable="all", device="cpu")
    sizes = _BatchSizes()
    _fit(strategy, _with_ids(64), 1, [sizes], model=_SqueezedLoss(), max_steps=40)  # q = 1/64: many B = 1
    assert 1 in sizes.sizes and strategy.accountant.steps == 40


class _BatchSizes(pl.Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, idx: int) -> None:
        self.sizes.append(int(batch[0].shape[0]))
