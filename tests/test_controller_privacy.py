"""Privacy of the controllers' own releases: count noise never replayed on resume, secure_rng governs it, the
standalone env never reuses Poisson batches, and DP-SGD-only callbacks refuse DP-ZO."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from dplightning.callbacks import AutomaticClipping, NoiseSchedule, QuantileClipping, RLDPController
from dplightning.envs import DPTrainingEnv
from dplightning.envs.rldp_core import ClipCountRelease
from dplightning.errors import DPLightningError
from dplightning.strategies import DPSGDStrategy, DPZOStrategy

CountCallback = RLDPController | QuantileClipping


# ---------------------------------------------------------------------------------------------- helpers
def _record_count_noise(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Every clip-count release from now on appends its noise (in examples): released − exact count."""
    draws: list[np.ndarray] = []
    original = ClipCountRelease.release

    def spy(
        self: ClipCountRelease, norms: dict[str, Tensor], thresholds: dict[str, float], sigma: float
    ) -> np.ndarray:
        fractions = original(self, norms, thresholds, sigma)
        exact = np.zeros(len(self.groups))
        for j, members in enumerate(self.groups):
            present = [g for g in members if g in norms]
            if present:
                clipped = torch.stack([(norms[g] > thresholds[g]).double() for g in present]).mean(0)
                exact[j] = float((clipped - 0.5).sum() if self.centered else clipped.sum())
        offset = 0.5 if self.centered else 0.0
        draws.append((fractions - offset) * self.expected_batch_size - exact)
        return fractions

    monkeypatch.setattr(ClipCountRelease, "release", spy)
    return draws


def _strategy(secure: bool, groups: int = 3, seed: int = 0) -> DPSGDStrategy:
    """A DPSGDStrategy as after setup/on_train_start, without a model."""
    s = DPSGDStrategy(
        target_epsilon=4.0, target_delta=1e-5, accountant="rdp", secure_rng=secure, device="cpu", seed=seed
    )
    s.groups = {f"layers.{i}.q_proj": [f"layers.{i}.q_proj.lora_A.default.weight"] for i in range(groups)}
    s.clip_thresholds = dict.fromkeys(s.groups, 1.0)
    s.sample_rate, s.planned_steps, s.expected_batch_size = 0.05, 100, 32.0
    s.set_noise_multiplier(1.0)
    return s


def _callback(kind: str, state: dict[str, Any] | None = None) -> CountCallback:
    callback: CountCallback = (
        RLDPController(seed=3, count_budget_fraction=0.05) if kind == "rldp" else QuantileClipping(seed=3)
    )
    if state is not None:
        callback.load_state_dict(state)
    return callback


def _draws(callback: CountCallback, strategy: DPSGDStrategy, n: int = 3) -> np.ndarray:
    """``n`` count releases of the same (all-unclipped) norms: they differ only through the noise."""
    if (callback.counts if isinstance(callback, RLDPController) else callback.release) is None:
        callback.initialise(strategy)
    release = callback.counts if isinstance(callback, RLDPController) else callback.release
    assert release is not None
    norms = {g: torch.zeros(8) for g in strategy.group_names}
    return np.stack([release.release(norms, strategy.clip_thresholds, 1.0) for _ in range(n)])


# ------------------------------------------------------------------------------------- resume: no replay
def _tiny_rldp_fit(
    tmp_path: Path, max_steps: int, stop_after: int | None = None, ckpt: str | None = None
) -> None:
    from dplightning.data import TextDataModule
    from dplightning.module import DPLoRAModule

    class Interrupt(pl.Callback):  # the same plan, cut short as a crash would
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            trainer.should_stop = stop_after is not None and trainer.global_step >= stop_after

    callbacks: list[pl.Callback] = [
        RLDPController(warmup_steps=100, seed=1, count_budget_fraction=0.05),
        Interrupt(),
    ]  # counts only, no decision
    if stop_after is not None:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop_after, save_top_k=-1)
        )
    strategy = DPSGDStrategy(
        target_epsilon=8.0, target_delta=1e-4, clipping="per_adapter", accountant="rdp", device="cpu", seed=0
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        strategy=strategy,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=stop_after is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    model = DPLoRAModule(model_name="tiny-llama", lora_rank=2, learning_rate=0.01, seed=0)
    data = TextDataModule(
        tokenizer="tiny-llama", num_records=160, max_length=16, batch_size=8, public_fraction=0.1
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)


def test_rldp_resume_continues_the_count_noise_instead_of_replaying_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-drawing steps 1…k's noise after a resume would let two releases of different counts be differenced."""
    draws = _record_count_noise(monkeypatch)
    _tiny_rldp_fit(tmp_path / "full", max_steps=4)
    full = np.stack(draws)
    draws.clear()
    _tiny_rldp_fit(tmp_path / "cut", max_steps=4, stop_after=2)
    draws.clear()
    _tiny_rldp_fit(tmp_path / "resumed", max_steps=4, ckpt=str(next((tmp_path / "cut").glob("*step=2.ckpt"))))
    resumed = np.stack(draws)
    assert full.shape[0] == 4 and resumed.shape == full[2:].shape
    np.testing.assert_allclose(resumed, full[2:], rtol=0, atol=1e-9)  # the uninterrupted run's noise ...
    assert np.abs(resumed - full[:2]).min() > 1e-3  # ... not the start's again


@pytest.mark.parametrize("kind", ["rldp", "quantile"])
def test_state_saved_before_the_first_batch_keeps_the_noise_stream(kind: str) -> None:
    """A checkpoint written right after a resume (before the callback restarted) must still carry the stream."""
    strategy = _strategy(secure=False)
    first = _callback(kind)
    _draws(first, strategy)
    relay = _callback(kind, first.state_dict())
    resumed = _callback(kind, relay.state_dict())  # relay never ran a batch
    np.testing.assert_array_equal(_draws(resumed, strategy), _draws(first, strategy))


# ------------------------------------------------------------------------------------------- secure_rng
@pytest.mark.parametrize("kind", ["rldp", "quantile"])
def test_count_noise_follows_the_strategys_secret_seed_not_a_public_one(kind: str) -> None:
    """Count noise drawn from a public seed (the run's ``seed_everything``, a callback default) could be
    regenerated and subtracted from the logged fractions, leaving exact subsampled counts."""

    def draws(strategy_seed: int, callback_seed: int) -> np.ndarray:
        callback: CountCallback = (
            RLDPController(seed=callback_seed, count_budget_fraction=0.05)
            if kind == "rldp"
            else QuantileClipping()  # no seed of its own: the strategy's
        )
        return _draws(callback, _strategy(secure=False, seed=strategy_seed))

    assert np.abs(draws(0, 3) - draws(5, 3)).min() > 0  # another strategy seed: other noise
    np.testing.assert_array_equal(draws(5, 3), draws(5, 4))  # the agent's (public) seed plays no part
    if (
        kind == "quantile"
    ):  # a seed of its own is hashed too: raw, it would replay the gradient noise's stream
        np.testing.assert_array_equal(_draws(QuantileClipping(seed=5), _strategy(False, seed=0)), draws(5, 3))


@pytest.mark.parametrize("kind", ["rldp", "quantile"])
def test_secure_rng_draws_the_count_noise_from_the_csprng(kind: str) -> None:
    seeded = [_draws(_callback(kind), _strategy(secure=False)) for _ in range(2)]
    np.testing.assert_array_equal(seeded[0], seeded[1])  # same seed, same noise: reproducible
    secure = [_draws(_callback(kind), _strategy(secure=True)) for _ in range(2)]
    assert np.abs(secure[0] - secure[1]).min() > 0  # same seed, independent noise


@pytest.mark.parametrize("kind", ["rldp", "quantile"])
def test_resumed_secure_run_never_falls_back_to_seeded_count_noise(kind: str) -> None:
    run = _callback(kind)
    _draws(run, _strategy(secure=True))
    state = run.state_dict()
    # even when resumed under a strategy that says secure_rng=False, the noise stays on the CSPRNG
    a, b = (_draws(_callback(kind, state), _strategy(secure=False)) for _ in range(2))
    assert np.abs(a - b).min() > 0
    assert state["count_noise"] == {"secure": True}  # nothing to restore, nothing that could replay


# ------------------------------------------------------------------------------------------ simulator
def test_simulator_draws_fresh_poisson_batches_every_epoch() -> None:
    env = DPTrainingEnv(
        model_name="tiny-llama",
        num_records=120,
        max_length=16,
        batch_size=16,
        eval_examples=8,
        episode_steps=18,
        rl_interval=6,
        seed=2,
    )  # 94 public training notes, q = 16/94: 6 logical batches per epoch
    env.reset(seed=2)
    masks: list[frozenset[int]] = []
    logical_batch = env.sampler.logical_batch

    def spy(index: int) -> np.ndarray:
        batch = logical_batch(index)
        masks.append(frozenset(batch.tolist()))
        return batch

    env.sampler.logical_batch = spy  # type: ignore[method-assign]
    done = False
    while not done:
        *_, done, _, _ = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
    assert env.sampler.num_batches == 6 and len(masks) == 18  # three epochs of 6 logical batches
    assert len(set(masks)) == len(masks)  # no batch is a replay of an earlier one
    assert env.sampler.epoch == 2


def test_rldp_without_count_channel_releases_nothing_but_the_gradient() -> None:
    """By default the agent sees public data and post-processing only: no auxiliary release, σ_eff = σ."""
    strategy = _strategy(secure=False)
    controller = RLDPController(seed=0)
    controller.initialise(strategy)
    assert controller.counts is None and strategy.auxiliary_noise_multipliers == {}
    assert strategy.effective_noise_multiplier == pytest.approx(1.0)
    with_counts = RLDPController(seed=0, count_budget_fraction=0.05)
    strategy2 = _strategy(secure=False)
    with_counts.initialise(strategy2)
    assert set(strategy2.auxiliary_noise_multipliers) == {"rldp_clip_counts"}
    assert strategy2.effective_noise_multiplier == pytest.approx(1.0)  # the split still costs exactly σ


# ------------------------------------------------------------------------------------- DP-ZO refusals
def _trainer_with(strategy: Any) -> SimpleNamespace:
    return SimpleNamespace(strategy=strategy, callbacks=[], datamodule=None)


@pytest.mark.parametrize("callback", [AutomaticClipping, QuantileClipping, RLDPController])
def test_dpsgd_only_callbacks_refuse_dpzo(callback: type[pl.Callback]) -> None:
    """DP-ZO has no per-example gradients: normalisation would be ignored and clip counts pure noise."""
    strategy = DPZOStrategy(target_epsilon=2.0, device="cpu")
    with pytest.raises(DPLightningError, match="DPZOStrategy"):
        callback().setup(_trainer_with(strategy), pl.LightningModule(), "fit")


@pytest.mark.parametrize("callback", [AutomaticClipping, QuantileClipping, RLDPController])
def test_dpsgd_only_callbacks_refuse_look_alikes(callback: type[pl.Callback]) -> None:
    """Refused by class, not by attributes: a strategy with DP-SGD's attributes but not DP-SGD (as DP-ZO would be
    if it stopped subclassing DPSGDStrategy) is refused too."""
    look_alike = SimpleNamespace(
        set_clip_thresholds=None,
        private_step_norms={},
        auxiliary_noise_multipliers={},
        normalization_stability=None,
        world_size=1,
        noise="gaussian",
        target_epsilon=8.0,
        max_epsilon=None,
    )
    with pytest.raises(DPLightningError, match="DPSGDStrategy"):
        callback().setup(_trainer_with(look_alike), pl.LightningModule(), "fit")


class _Mean(pl.LightningModule):
    """θ ``[4]`` fitted to the points: per-example loss ``½||x − θ||²``."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(4))

    def per_example_loss(self, batch: Any) -> Tensor:
        return 0.5 * (batch[0] - self.theta).pow(2).sum(1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_noise_schedule_is_meaningful_on_gaussian_dpzo() -> None:
    """NoiseSchedule only sets σ of the step's Gaussian release, which DP-ZO has too: it is kept there."""
    strategy = DPZOStrategy(target_epsilon=3.0, accountant="rdp", perturbation="inplace", device="cpu")
    used: list[float] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            used.append(strategy.accountant.history[-1][0].noise_multiplier)

    points = TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))
    pl.Trainer(
        strategy=strategy,
        callbacks=[NoiseSchedule(schedule="linear", final_ratio=0.5), Spy()],
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(_Mean(), DataLoader(points, batch_size=8))
    assert used[0] > used[-1] and used[-1] == pytest.approx(used[0] * 0.5, rel=0.1)  # charged σ decayed
    assert strategy.epsilon() <= 3.0


@pytest.mark.parametrize("centered", [False, True])
def test_clip_count_releases_are_on_the_count_grid(centered: bool) -> None:
    from dplightning.envs.rldp_core import COUNT_GRID, ClipCountRelease
    from dplightning.privacy.noise_addition import NoiseSource

    release = ClipCountRelease([["a"], ["b", "c"]], 16.0, NoiseSource(seed=0), centered=centered)
    gen = torch.Generator().manual_seed(0)
    norms = {g: torch.rand(13, generator=gen, dtype=torch.float64) * 2 for g in "abc"}
    for _ in range(20):
        fractions = release.release(norms, {"a": 1.0, "b": 0.7, "c": 1.3}, sigma_count=3.0)
        units = (fractions - (0.5 if centered else 0.0)) * 16.0 / COUNT_GRID
        assert np.allclose(units, np.round(units), rtol=0, atol=1e-3)
