"""RLDP: Gymnasium env, SAC controller, budget guard under any actions, privatised observations, policy I/O."""

from __future__ import annotations

import functools
from pathlib import Path

import gymnasium as gym
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import fake_dpsgd_strategy
from gymnasium.utils.env_checker import check_env

from dplightning.callbacks import PrivacyBudget, RLDPController
from dplightning.envs import DPTrainingEnv
from dplightning.envs.rldp_core import ActionMapper, action_groups, split_sigma
from dplightning.errors import DPLightningError
from dplightning.privacy.accounting import noise_for_target
from dplightning.privacy.noise_addition import NoiseSource
from dplightning.strategies import DPSGDStrategy


def test_env_passes_gymnasium_checker_and_is_registered() -> None:
    env = gym.make("dplightning/DPTraining-v0", episode_steps=4).unwrapped
    assert isinstance(env, DPTrainingEnv)
    check_env(env)
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape == (5 + 3 * 3,)
    assert env.action_space.shape == (4,)


@pytest.mark.slow
def test_sac_learns_on_standalone_env() -> None:
    from stable_baselines3 import SAC

    env = DPTrainingEnv(episode_steps=10, rl_interval=1, seed=1)
    agent = SAC(
        "MlpPolicy", env, learning_starts=10, batch_size=32, seed=0, policy_kwargs={"net_arch": [32, 32]}
    )
    agent.learn(total_timesteps=300)
    assert agent.num_timesteps == 300
    assert agent.replay_buffer.size() == 300
    assert agent.logger.name_to_value.get("train/critic_loss") is not None


def test_episode_never_exceeds_budget_and_training_helps() -> None:
    env = DPTrainingEnv(episode_steps=15, rl_interval=2, target_epsilon=2.0, seed=3)
    rng = np.random.default_rng(0)
    env.reset(seed=3)
    first_loss = env.initial_loss
    done = False
    while not done:
        _, _, done, _, info = env.step(rng.uniform(-1, 1, size=4).astype(np.float32))
    assert info["epsilon"] <= 2.0
    assert info["public_loss"] < first_loss  # private training on the task really learns


def _fake_strategy(
    target: float, accountant: str, groups: int = 6, steps: int = 120, q: float = 0.05
) -> DPSGDStrategy:
    names = {f"layers.{i}.q_proj": [f"layers.{i}.q_proj.lora_A.default.weight"] for i in range(groups)}
    sigma = _calibrated(target, q, steps, accountant)
    return fake_dpsgd_strategy(
        names, 1.0 / np.sqrt(groups), sigma, q, steps, 32.0, target_epsilon=target, accountant=accountant
    )


@functools.cache
def _calibrated(target: float, q: float, steps: int, accountant: str) -> float:
    return noise_for_target(target, 1e-5, q, steps, accountant=accountant)  # type: ignore[arg-type]


@pytest.mark.parametrize(("accountant", "sequences"), [("rdp", 100), ("pld", 3)])
def test_epsilon_stays_within_target_under_random_actions(accountant: str, sequences: int) -> None:
    target, steps, q = 2.0, 120, 0.05
    for seq in range(sequences):
        strategy = _fake_strategy(target, accountant, steps=steps, q=q)
        controller = RLDPController(rl_interval=10, warmup_steps=0, sigma_bounds=(0.5, 1.5), seed=seq)
        controller.initialise(strategy)
        rng = np.random.default_rng(seq)
        stopped = False
        for step in range(steps):
            if step % 10 == 0:
                # adversarial mixes: uniform, always-minimum σ, extreme clip multipliers
                kind = seq % 3
                action = rng.uniform(-1, 1, size=controller.mapper.action_size)
                if kind == 1:
                    action[-1] = -1.0
                elif kind == 2:
                    action = np.sign(action)
                if controller.apply_action(action) is None:
                    stopped = True
                    break
            strategy.accountant.step(
                strategy.effective_noise_multiplier, q
            )  # what release_noisy_gradient charges
        eps = strategy.accountant.epsilon(1e-5)
        assert eps <= target * (1 + 1e-9), (seq, eps)
        assert stopped or strategy.accountant.steps == steps


def test_noise_split_costs_exactly_sigma_and_actions_move_thresholds() -> None:
    sigma_grad, sigma_count = split_sigma(1.3, 0.05)
    assert 1.3 <= (sigma_grad**-2 + sigma_count**-2) ** -0.5 == pytest.approx(1.3, rel=1e-9)
    strategy = _fake_strategy(4.0, "rdp")
    controller = RLDPController(rl_interval=5, warmup_steps=0)
    controller.initialise(strategy)
    assert strategy.effective_noise_multiplier == pytest.approx(controller.mapper.base_sigma)
    before = dict(strategy.clip_thresholds)
    used = controller.apply_action(np.array([1, -1, 1, -1, 1, -1, 1], dtype=np.float32))
    assert (
        controller.mapper.base_sigma * 1.5
        <= used
        == pytest.approx(controller.mapper.base_sigma * 1.5, rel=0.012)
    )
    assert strategy.effective_noise_multiplier == pytest.approx(used)
    ratios = [strategy.clip_thresholds[g] / before[g] for g in before]
    assert ratios[0] == pytest.approx(4.0) and ratios[1] == pytest.approx(0.25)


def test_action_groups_and_mapper_bounds() -> None:
    names = [f"g{i}" for i in range(10)]
    assert len(action_groups(names, "per_adapter")) == 10
    assert action_groups(names, "global") == [names]
    blocks = action_groups(names, "per_layer_group", 4)
    assert len(blocks) == 4 and sum(len(b) for b in blocks) == 10
    with pytest.raises(DPLightningError):
        action_groups(names, "bogus")
    mapper = ActionMapper(1.0, dict.fromkeys(names, 0.5), blocks, (0.7, 1.5), (0.25, 4.0))
    for a in np.random.default_rng(0).uniform(-3, 3, size=(50, 5)):
        sigma, clips = mapper(a)
        assert 0.7 - 1e-9 <= sigma <= 1.5 + 1e-9
        assert all(0.125 - 1e-9 <= c <= 2.0 + 1e-9 for c in clips.values())


def test_observations_see_private_data_only_through_noisy_channels() -> None:
    """Swap the private data set (same size, same public split, same noise draws). Fields that are not noisy
    channels must be identical; the privatised clip fractions may differ only by less than their own noise."""

    def rollout(private_seed: int) -> tuple[np.ndarray, DPTrainingEnv]:
        env = DPTrainingEnv(
            episode_steps=6, rl_interval=2, target_epsilon=0.5, seed=5, private_data_seed=private_seed
        )
        obs, _ = env.reset(seed=5)
        out = [obs]
        for _ in range(6):
            obs, *_ = env.step(np.zeros(4, dtype=np.float32))
            out.append(obs)
        return np.stack(out), env

    (a, env), (b, _) = rollout(1), rollout(2)
    k = env.num_groups
    public_fields = [2, 3, 4, *range(5, 5 + k)]  # ε ratio, progress, σ, clip thresholds: no data in them
    np.testing.assert_array_equal(a[:, public_fields], b[:, public_fields])
    fractions = slice(5 + k, 5 + 2 * k)
    _, sigma_count = split_sigma(env.sigma, env.count_budget_fraction)
    count_noise_std = sigma_count * np.sqrt(k) / env.batch_size / np.sqrt(env.rl_interval)  # interval mean
    assert np.abs(a[:, fractions] - b[:, fractions]).max() < count_noise_std
    assert not np.array_equal(a, b)  # the data does reach the observation, through the noisy channels


def test_clip_count_release_has_stated_noise() -> None:
    from dplightning.envs.rldp_core import ClipCountRelease

    groups = [["a"], ["b", "c"]]
    release = ClipCountRelease(groups, expected_batch_size=10.0, noise=NoiseSource(seed=0))
    norms = {
        "a": torch.tensor([0.5, 2.0, 3.0]),
        "b": torch.tensor([2.0, 0.1, 0.1]),
        "c": torch.tensor([2.0, 2.0, 0.1]),
    }
    thresholds = {"a": 1.0, "b": 1.0, "c": 1.0}
    draws = np.stack([release.release(norms, thresholds, sigma_count=0.8) for _ in range(4000)])
    true = np.array([2.0, 1.5]) / 10.0  # a: 2 clipped; b,c: mean of (1,0,0) and (1,1,0)
    np.testing.assert_allclose(draws.mean(0), true, atol=0.01)
    np.testing.assert_allclose(draws.std(0), 0.8 * np.sqrt(2) / 10.0, rtol=0.05)


def _tiny_trainer(
    tmp_path: Path, controller: RLDPController, max_steps: int, **kw: object
) -> tuple[pl.Trainer, DPSGDStrategy]:
    strategy = DPSGDStrategy(
        target_epsilon=8.0, target_delta=1e-4, clipping="per_adapter", accountant="rdp", device="cpu", seed=0
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        strategy=strategy,
        callbacks=[controller, PrivacyBudget(), *kw.pop("callbacks", [])],  # type: ignore[list-item]
        logger=pl.loggers.TensorBoardLogger(tmp_path, name="rldp"),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
        **kw,  # type: ignore[arg-type]
    )
    return trainer, strategy


def _tiny_parts(seed: int = 0):
    from dplightning.data import TextDataModule
    from dplightning.module import DPLoRAModule

    model = DPLoRAModule(model_name="tiny-llama", lora_rank=2, learning_rate=0.01, seed=seed)
    data = TextDataModule(
        tokenizer="tiny-llama",
        num_records=160,
        max_length=32,
        batch_size=8,
        public_fraction=0.1,
        data_seed=seed,
    )
    return model, data


def test_live_controller_changes_thresholds_and_sigma_after_warmup(tmp_path: Path) -> None:
    model, data = _tiny_parts()
    controller = RLDPController(
        rl_interval=2,
        warmup_steps=4,
        action_scope="per_layer_group",
        num_layer_groups=2,
        batch_size=4,
        learning_starts=1,
        save_policy_to=str(tmp_path / "policy.zip"),
    )
    trainer, strategy = _tiny_trainer(tmp_path, controller, max_steps=12, enable_checkpointing=False)
    seen: list[tuple[float, dict[str, float]]] = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, *args: object) -> None:
            seen.append((strategy.effective_noise_multiplier, dict(strategy.clip_thresholds)))

    trainer.callbacks.append(Spy())
    trainer.fit(model, datamodule=data)
    warm = seen[1:4]  # steps before the first decision: thresholds as calibrated
    assert all(w[1] == warm[0][1] for w in warm)
    after = seen[6:]
    assert any(a[1] != warm[0][1] for a in after)
    assert any(abs(a[0] - warm[0][0]) > 1e-6 for a in after)
    assert controller.decisions >= 3
    assert controller.agent.replay_buffer.size() >= 2
    assert strategy.epsilon() <= 8.0
    assert (tmp_path / "policy.zip").exists()
    # TensorBoard got the controller's scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(trainer.logger.log_dir)))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"rldp/sigma", "rldp/reward", "rldp/action_0", "privacy/epsilon"} <= tags


def test_policy_save_load_gives_identical_deterministic_actions(tmp_path: Path) -> None:
    from stable_baselines3 import SAC

    env = DPTrainingEnv(num_groups=1, episode_steps=5, rl_interval=1)
    agent = SAC("MlpPolicy", env, learning_starts=5, batch_size=8, seed=0, policy_kwargs={"net_arch": [16]})
    agent.learn(total_timesteps=12)
    strategy = _fake_strategy(4.0, "rdp", groups=2)
    controller = RLDPController(action_scope="global")
    controller.initialise(strategy)
    controller.agent = agent
    path = controller.save_policy(tmp_path / "p.zip")
    reloaded = SAC.load(path, env=env)
    obs = (
        np.random.default_rng(0).uniform(-1, 1, size=(20, env.observation_space.shape[0])).astype(np.float32)
    )
    a1, _ = agent.predict(obs, deterministic=True)
    a2, _ = reloaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(a1, a2)
    # transfer: a policy over 1 action group drives a strategy with a different number of adapters (global scope)
    other = _fake_strategy(4.0, "rdp", groups=9)
    transfer = RLDPController(action_scope="global", policy_path=str(path), deterministic=True)
    transfer.initialise(other)
    assert transfer.apply_action(transfer.agent.predict(obs[0], deterministic=True)[0]) is not None


def test_resume_restores_agent_and_replay_buffer(tmp_path: Path) -> None:
    def controller() -> RLDPController:
        return RLDPController(
            rl_interval=2, warmup_steps=2, action_scope="global", batch_size=4, learning_starts=1
        )

    model, data = _tiny_parts()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=8, save_top_k=-1)
    full = controller()
    trainer, _ = _tiny_trainer(tmp_path, full, max_steps=12, callbacks=[ckpt])
    trainer.fit(model, datamodule=data)
    path = next((tmp_path / "ck").glob("*step=8.ckpt"))
    saved = torch.load(path, weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("RLDPController"))
    assert (
        state["decisions"] == 4
    )  # decisions at steps 2, 4, 6, 8 (the controller runs before ModelCheckpoint)

    model2, data2 = _tiny_parts()
    resumed = controller()
    trainer2, strategy2 = _tiny_trainer(tmp_path, resumed, max_steps=12, enable_checkpointing=False)
    trainer2.fit(model2, datamodule=data2, ckpt_path=str(path))
    assert resumed.decisions == full.decisions  # continued the count, not restarted
    assert resumed.agent.replay_buffer.size() == full.agent.replay_buffer.size()
    assert strategy2.accountant.steps == 12
    assert strategy2.epsilon() <= 8.0


def test_controller_errors() -> None:
    with pytest.raises(DPLightningError, match="not found"):
        RLDPController(policy_path="/nonexistent/policy.zip")
    with pytest.raises(DPLightningError, match="sigma_bounds"):
        RLDPController(sigma_bounds=(1.2, 2.0))
    assert torch.isfinite(torch.tensor(1.0))


def test_controller_refuses_lmo_noise_and_ddp() -> None:
    """Its clip counts are Gaussian releases charged through σ_eff, and per-rank counts would diverge under DDP."""
    from types import SimpleNamespace

    def trainer(**overrides: object) -> SimpleNamespace:
        strategy = DPSGDStrategy(target_epsilon=8.0, device="cpu")
        for name, value in overrides.items():  # what an LMO or a DDP strategy would report
            setattr(strategy, name, value)
        return SimpleNamespace(strategy=strategy, datamodule=None)

    with pytest.raises(DPLightningError, match="noise='lmo'"):
        RLDPController().setup(trainer(noise="lmo"), pl.LightningModule(), "fit")
    with pytest.raises(DPLightningError, match="without DDP"):
        RLDPController().setup(trainer(world_size=2), pl.LightningModule(), "fit")
    with pytest.raises(DPLightningError, match="per_example_loss"):  # the valid strategy passes both checks
        RLDPController().setup(trainer(), pl.LightningModule(), "fit")
