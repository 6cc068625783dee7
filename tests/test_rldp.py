"""RLDP: the mean action is tuned DP-SGD bit for bit, the action reaches the clip norm and σ within bounds, the
budget guard holds under any actions, the SAC set-up, seeds, the prior policy, resume, the controller's errors."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import StopAfter, fake_dpsgd_strategy, load_benchmark

from dplightning.callbacks import PrivacyBudget, RLDPController
from dplightning.envs.rldp_agent import RLDPAgent
from dplightning.envs.rldp_core import (
    OBS_FIELDS,
    ActionMapper,
    allocation_blocks,
    build_observation,
    observation_size,
    reward,
)
from dplightning.errors import DPLightningError
from dplightning.privacy.accounting import noise_for_target
from dplightning.strategies import DPSGDStrategy


# ---------------------------------------------------------------------------------------------- helpers
def _fake_strategy(
    target: float, accountant: str, groups: int = 1, steps: int = 120, q: float = 0.05
) -> DPSGDStrategy:
    names = {f"layers.{i}.q_proj": [f"layers.{i}.q_proj.lora_A.default.weight"] for i in range(groups)}
    sigma = _calibrated(target, q, steps, accountant)
    return fake_dpsgd_strategy(
        names, 1.0 / np.sqrt(groups), sigma, q, steps, 32.0, target_epsilon=target, accountant=accountant
    )


@functools.cache
def _calibrated(target: float, q: float, steps: int, accountant: str) -> float:
    return noise_for_target(target, 1e-5, q, steps, accountant=accountant)  # type: ignore[arg-type]


def _tiny_parts(seed: int = 0) -> tuple[Any, Any]:
    from dplightning.data import TextDataModule
    from dplightning.module import DPLoRAModule

    model = DPLoRAModule(
        model_name="tiny-llama", lora_rank=2, optimizer="sgd", momentum=0.9, learning_rate=0.5, seed=seed
    )
    data = TextDataModule(
        tokenizer="tiny-llama",
        num_records=160,
        max_length=16,
        batch_size=8,
        eval_batch_size=4,
        public_fraction=0.1,
        data_seed=seed,
    )
    return model, data


def _tiny_trainer(
    tmp_path: Path, callbacks: list[pl.Callback], max_steps: int, logger: bool = False, **kw: Any
) -> tuple[pl.Trainer, DPSGDStrategy]:
    strategy = DPSGDStrategy(
        target_epsilon=8.0, target_delta=1e-4, clipping="flat", accountant="rdp", device="cpu", seed=0
    )
    kw.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(
        max_steps=max_steps,
        strategy=strategy,
        callbacks=[*callbacks, PrivacyBudget()],
        logger=pl.loggers.TensorBoardLogger(tmp_path, name="rldp") if logger else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
        **kw,
    )
    return trainer, strategy


def _lora(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class _Spy(pl.Callback):
    """(σ, C) the strategy holds before every step."""

    def __init__(self, strategy: DPSGDStrategy) -> None:
        self.strategy = strategy
        self.seen: list[tuple[float, float]] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.seen.append((self.strategy.effective_noise_multiplier, self.strategy.total_clip_norm))


# ------------------------------------------------------------------------------ mean action = DP-SGD
def test_mean_action_reproduces_tuned_dpsgd_bit_for_bit(tmp_path: Path) -> None:
    """An untrained agent acting with its mean (action 0) at every decision gives exactly plain DP-SGD's LoRA
    weights and ε: same σ0, same C0, same noise, same batches, and the agent touches no global RNG."""
    model, data = _tiny_parts()
    plain, plain_strategy = _tiny_trainer(tmp_path / "plain", [], max_steps=6)
    plain.fit(model, datamodule=data)

    model2, data2 = _tiny_parts()
    controller = RLDPController(act="deterministic", rl_interval=2, public_batches=1, seed=0)
    rldp, rldp_strategy = _tiny_trainer(tmp_path / "rldp", [controller], max_steps=6)
    rldp.fit(model2, datamodule=data2)

    assert controller.decisions == 3  # steps 0, 2, 4 (step 6 is the terminal evaluation)
    assert controller.agent is not None and controller.agent.buffer_size == 3
    a, b = _lora(model), _lora(model2)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert rldp_strategy.epsilon() == plain_strategy.epsilon()
    assert rldp_strategy.accountant.history == plain_strategy.accountant.history


def test_untrained_agent_mean_is_zero_and_samples_stay_near_it() -> None:
    agent = RLDPAgent.create(observation_size(), 2, seed=0)
    obs = np.random.default_rng(0).uniform(-10, 10, size=(50, observation_size())).astype(np.float32)
    np.testing.assert_array_equal(agent.act(obs, deterministic=True), np.zeros((50, 2), dtype=np.float32))
    samples = agent.act(obs, deterministic=False)
    assert 0.05 < samples.std() < 0.3  # log-std −2: std ≈ 0.135, not uniform over [-1, 1] (std 0.58)
    assert float(agent.sac.ent_coef_tensor) == pytest.approx(0.01)  # fixed, not "auto"
    assert agent.sac.ent_coef_optimizer is None and agent.sac.gamma == 1.0


def test_agent_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(123)
    np.random.seed(123)
    agent = RLDPAgent.create(observation_size(), 2, seed=7)
    obs = np.zeros(observation_size(), dtype=np.float32)
    for _ in range(3):
        agent.add(obs, obs, agent.act(obs, deterministic=False), 1.0, False)
    agent.train(4, batch_size=2)
    torch.testing.assert_close(torch.rand(3), expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.rand(3), expected[1])


# --------------------------------------------------------------------------------------- action mapping
def test_action_moves_clip_norm_by_at_most_the_step_within_bounds_and_sets_sigma() -> None:
    mapper = ActionMapper(0.8, {"all": 1.0}, None, sigma_range=1.5, clip_range=4.0, clip_step=1.5)
    assert mapper.action_size == 2
    assert mapper.sigma(0.0) == 0.8 and mapper.sigma(1.0) == pytest.approx(1.2)
    assert mapper.sigma(-1.0) == pytest.approx(0.8 / 1.5) and mapper.sigma(5.0) == pytest.approx(1.2)
    clip = 1.0
    for a in np.random.default_rng(0).uniform(-3, 3, size=200):
        new = mapper.next_clip(clip, a)
        assert 1 / 1.5 - 1e-12 <= new / clip <= 1.5 + 1e-12 or new in (0.25, 4.0)
        assert 0.25 <= new <= 4.0
        clip = new
    assert mapper.next_clip(1.0, 0.0) == 1.0 and mapper.thresholds(1.0) == {"all": 1.0}
    assert mapper.next_clip(3.9, 1.0) == 4.0 and mapper.next_clip(0.3, -1.0) == 0.25


def test_allocation_keeps_the_total_sensitivity_within_the_clip_norm() -> None:
    names = [f"l{i}.lora_{m}" for i in range(4) for m in "AB"]
    ab = allocation_blocks(names, "lora_ab")
    assert ab is not None and [len(b) for b in ab] == [4, 4] and all("lora_A" in g for g in ab[0])
    blocks = allocation_blocks(names, 3)
    assert blocks is not None and sum(len(b) for b in blocks) == 8
    for blk in (ab, blocks):
        mapper = ActionMapper(1.0, dict.fromkeys(names, 1.0 / math.sqrt(8)), blk)
        for action in np.random.default_rng(1).uniform(-1.5, 1.5, size=(200, mapper.action_size)):
            clip = float(np.random.default_rng(2).uniform(0.25, 4.0))
            thresholds = mapper.thresholds(clip, action[2:])
            total = math.sqrt(sum(c * c for c in thresholds.values()))
            assert total <= clip and total == pytest.approx(clip, rel=1e-9)
        equal = mapper.thresholds(1.0, np.zeros(len(blk)))
        assert max(equal.values()) == pytest.approx(min(equal.values()))
    with pytest.raises(DPLightningError, match="per_layer"):
        allocation_blocks(["l0.q_proj", "l1.q_proj"], "lora_ab")  # per-adapter groups hold A and B together
    with pytest.raises(DPLightningError, match="clipping groups"):
        allocation_blocks(["all"], 2)
    with pytest.raises(DPLightningError, match="clip_allocation"):
        allocation_blocks(names, "bogus")


def test_observation_layout_and_reward() -> None:
    obs = build_observation(0.5, [2.0, 1.9, 1.8], 2.0, math.log(1.5), 0.4, 0.1, 0.7)
    assert obs.shape == (observation_size(),) == (8,) and len(OBS_FIELDS) == 9
    np.testing.assert_allclose(obs, [0.5, 0.9, -5.0, -5.0, math.log(1.5), 0.4, 0.1, 0.7], rtol=1e-6)
    assert reward(1.9, 1.8, 2.0) == pytest.approx(5.0)
    assert build_observation(0.0, [2.0], 2.0, 0.0, 0.0, 0.0, 0.0, [0.3]).shape == (9,)


# ----------------------------------------------------------------------------------------- budget guard
@pytest.mark.parametrize(("accountant", "sequences"), [("rdp", 100), ("pld", 3)])
def test_epsilon_stays_within_target_under_random_and_adversarial_actions(
    accountant: str, sequences: int
) -> None:
    target, steps, q = 2.0, 120, 0.05
    for seq in range(sequences):
        strategy = _fake_strategy(target, accountant, groups=1 + seq % 3, steps=steps, q=q)
        allocation = 2 if seq % 3 == 2 else None
        controller = RLDPController(rl_interval=10, seed=seq, clip_allocation=allocation)
        controller.initialise(strategy)
        assert controller.control is not None
        rng = np.random.default_rng(seq)
        stopped = False
        for step in range(steps):
            if step % 10 == 0:
                kind = seq % 4  # uniform, always the smallest σ, extremes, smallest σ and largest clip norm
                action = rng.uniform(-1, 1, size=controller.control.mapper.action_size)
                if kind == 1:
                    action[1] = -1.0
                elif kind == 2:
                    action = np.sign(action)
                elif kind == 3:
                    action[:2] = [1.0, -1.0]
                if controller.apply_action(action) is None:
                    stopped = True
                    break
            strategy.accountant.step(strategy.effective_noise_multiplier, q)  # what the release charges
        eps = strategy.accountant.epsilon(1e-5)
        assert eps <= target * (1 + 1e-9), (seq, eps)
        assert stopped or strategy.accountant.steps == steps


def test_actions_reach_the_strategy_and_sigma_is_only_raised_by_the_guard() -> None:
    strategy = _fake_strategy(4.0, "rdp")
    controller = RLDPController(rl_interval=5)
    controller.initialise(strategy)
    assert controller.control is not None
    base_sigma = controller.control.mapper.base_sigma
    assert base_sigma == strategy.noise_multiplier
    used = controller.apply_action(np.array([1.0, 1.0], dtype=np.float32))
    assert used == pytest.approx(base_sigma * 1.5)
    assert strategy.effective_noise_multiplier == pytest.approx(used)
    assert strategy.total_clip_norm == pytest.approx(1.5)
    used = controller.apply_action(np.array([1.0, -1.0], dtype=np.float32))
    assert used is not None and used >= base_sigma / 1.5
    assert strategy.total_clip_norm == pytest.approx(2.25)
    # noise std follows the clip norm: σ_g·C_g = σ·C_total for the one group
    (group,) = strategy.group_names
    assert strategy.noise_multipliers[group] * strategy.clip_thresholds[group] == pytest.approx(used * 2.25)


# ------------------------------------------------------------------------------------ seeds and priors
def test_controller_seed_follows_the_run_seed_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    obs = np.zeros(observation_size(), dtype=np.float32)

    def sampled(seed_everything: int, seed: int | None = None) -> tuple[int, np.ndarray]:
        pl.seed_everything(seed_everything, verbose=False)
        controller = RLDPController(seed=seed)
        controller.initialise(_fake_strategy(4.0, "rdp"))
        assert controller.agent is not None
        return controller.resolved_seed, controller.agent.act(obs, deterministic=False)

    (s5, a5), (s6, a6), (_, a5b) = sampled(5), sampled(6), sampled(5)
    assert (s5, s6) == (5, 6)
    assert not np.array_equal(a5, a6)  # different run seeds, different agents
    np.testing.assert_array_equal(a5, a5b)
    assert sampled(6, seed=5)[0] == 5  # an explicit seed wins
    np.testing.assert_array_equal(sampled(6, seed=5)[1], a5)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert RLDPController().resolved_seed == 0


def test_prior_policy_loads_and_acts_deterministically(tmp_path: Path) -> None:
    agent = RLDPAgent.create(observation_size(), 2, seed=0, batch_size=8)
    rng = np.random.default_rng(0)
    for _ in range(16):
        o, o2 = rng.uniform(-1, 1, size=(2, observation_size())).astype(np.float32)
        a = rng.uniform(-1, 1, size=2).astype(np.float32)
        agent.add(o, o2, a, float(a[0]), False)
    agent.train(32)
    path = agent.save(tmp_path / "prior.zip")
    obs = rng.uniform(-1, 1, size=(20, observation_size())).astype(np.float32)
    expected = agent.act(obs, deterministic=True)
    assert np.abs(expected).max() > 0  # training moved the mean away from the recipe

    controller = RLDPController(policy_path=str(path), act="deterministic")
    controller.initialise(_fake_strategy(4.0, "rdp"))
    assert controller.agent is not None
    np.testing.assert_array_equal(controller.agent.act(obs, deterministic=True), expected)
    np.testing.assert_array_equal(controller.agent.act(obs, deterministic=True), expected)
    assert controller.apply_action(expected[0]) is not None
    with pytest.raises(DPLightningError, match="clip_allocation"):  # a policy for another action space
        RLDPController(policy_path=str(path), clip_allocation=2).initialise(
            _fake_strategy(4.0, "rdp", groups=4)
        )


# ------------------------------------------------------------------------------------------ live runs
def test_live_controller_moves_clip_norm_and_sigma_and_logs(tmp_path: Path) -> None:
    model, data = _tiny_parts()
    controller = RLDPController(
        rl_interval=2,
        warmup_steps=2,
        gradient_steps=4,
        batch_size=4,
        initial_log_std=0.0,  # wide samples: the test needs the applied values to move
        public_batches=1,
        save_policy_to=str(tmp_path / "policy.zip"),
    )
    trainer, strategy = _tiny_trainer(tmp_path, [controller], max_steps=8, logger=True)
    spy = _Spy(strategy)
    trainer.callbacks.append(spy)
    trainer.fit(model, datamodule=data)
    warm = spy.seen[:2]  # steps 1 and 2, before the first decision (after step 2): σ0 and C0
    assert warm[0] == warm[1] and warm[0][1] == 1.0
    after = spy.seen[2:]
    assert any(a[1] != 1.0 for a in after) and any(abs(a[0] - warm[0][0]) > 1e-6 for a in after)
    assert controller.decisions == 3  # steps 2, 4, 6; step 8 closes the episode
    assert controller.agent is not None and controller.agent.buffer_size == 3
    assert controller.agent.sac.replay_buffer.dones[2, 0] == 1.0  # the last transition is terminal
    assert controller.agent.sac.replay_buffer.dones[:2, 0].sum() == 0
    assert strategy.epsilon() <= 8.0
    assert (tmp_path / "policy.zip").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(trainer.logger.log_dir)))  # type: ignore[union-attr]
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"rldp/sigma", "rldp/clip", "rldp/reward", "rldp/action_0", "rldp/public_loss"} <= tags


def test_rewards_score_the_same_public_examples_every_decision(tmp_path: Path) -> None:
    model, data = _tiny_parts()
    controller = RLDPController(act="deterministic", rl_interval=2, public_batches=2, seed=0)
    seen: list[list[torch.Tensor]] = []
    original = RLDPController.public_loss

    def spy(self: RLDPController, pl_module: pl.LightningModule) -> float:
        assert self._fixed_batches is not None
        seen.append([b["input_ids"].clone() for b in self._fixed_batches])
        return original(self, pl_module)

    RLDPController.public_loss = spy  # type: ignore[method-assign]
    try:
        trainer, _ = _tiny_trainer(tmp_path, [controller], max_steps=4)
        trainer.fit(model, datamodule=data)
    finally:
        RLDPController.public_loss = original  # type: ignore[method-assign]
    assert len(seen) == 3 and len(seen[0]) == 2
    for batches in seen[1:]:
        assert all(torch.equal(x, y) for x, y in zip(batches, seen[0]))


def test_resume_continues_agent_replay_buffer_and_random_streams(tmp_path: Path) -> None:
    def controller() -> RLDPController:
        return RLDPController(rl_interval=2, gradient_steps=4, batch_size=4, public_batches=1, seed=0)

    model, data = _tiny_parts()
    full = controller()
    trainer, _ = _tiny_trainer(tmp_path, [full], max_steps=8)
    trainer.fit(model, datamodule=data)
    # The same run interrupted after step 4, so that its step-4 checkpoint is its latest.
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    trainer, _ = _tiny_trainer(
        tmp_path, [controller(), StopAfter(4), ckpt], max_steps=8, enable_checkpointing=True
    )
    model1, data1 = _tiny_parts()
    trainer.fit(model1, datamodule=data1)
    path = next((tmp_path / "ck").glob("*step=4.ckpt"))
    saved = torch.load(path, weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("RLDPController"))
    assert state["decisions"] == 3  # decisions at steps 0, 2, 4 (the controller runs before ModelCheckpoint)

    model2, data2 = _tiny_parts()
    resumed = controller()
    trainer2, strategy2 = _tiny_trainer(tmp_path, [resumed], max_steps=8)
    trainer2.fit(model2, datamodule=data2, ckpt_path=str(path))
    assert resumed.decisions == full.decisions == 4
    assert full.agent is not None and resumed.agent is not None
    assert resumed.agent.buffer_size == full.agent.buffer_size == 4
    buf_a, buf_b = full.agent.sac.replay_buffer, resumed.agent.sac.replay_buffer
    for field in ("observations", "actions", "rewards", "dones"):
        np.testing.assert_array_equal(getattr(buf_a, field)[:4], getattr(buf_b, field)[:4])
    for (name, p), (_, q) in zip(
        full.agent.sac.policy.named_parameters(), resumed.agent.sac.policy.named_parameters()
    ):
        assert torch.equal(p, q), name  # same updates from the same samples: the agent's stream continued
    assert strategy2.accountant.steps == 8 and strategy2.epsilon() <= 8.0


# ------------------------------------------------------------------------------------------------ errors
def test_controller_errors() -> None:
    with pytest.raises(DPLightningError, match="not found"):
        RLDPController(policy_path="/nonexistent/policy.zip")
    with pytest.raises(DPLightningError, match="sigma_range"):
        RLDPController(sigma_range=0.5)
    with pytest.raises(DPLightningError, match="act must be"):
        RLDPController(act="greedy")  # type: ignore[arg-type]
    with pytest.raises(DPLightningError, match="ent_coef"):
        RLDPController(ent_coef="auto")  # type: ignore[arg-type]
    with pytest.raises(DPLightningError, match="count_budget_fraction"):
        RLDPController(count_budget_fraction=1.0)
    with pytest.warns(DeprecationWarning, match="action_scope"):
        RLDPController(action_scope="per_adapter")


def test_controller_refuses_lmo_noise_and_ddp() -> None:
    """σ is a Gaussian multiplier, and per-rank decisions would diverge under DDP."""
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


# ------------------------------------------------------------------------------------ simulator, prior
SIM = {
    "model_name": "tiny-llama",
    "num_records": 120,
    "max_length": 16,
    "batch_size": 16,
    "eval_examples": 8,
    "episode_steps": 4,
    "rl_interval": 2,
}


def test_simulator_reads_only_public_notes_of_another_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    from dplightning.data import TextDataModule
    from dplightning.envs import DPTrainingEnv

    private = set(TextDataModule(tokenizer="tiny-llama", num_records=120, data_seed=0).train_texts)

    def refuse(self: object) -> object:
        raise AssertionError("the simulator read a training split")

    for name in ("train_texts", "val_texts", "test_texts"):
        monkeypatch.setattr(TextDataModule, name, property(refuse))
    monkeypatch.setattr(TextDataModule, "train_dataloader", refuse)
    env = DPTrainingEnv(**SIM, simulation_seed=1, private_data_seed=0)
    env.reset(seed=0)
    env.step(np.zeros(2, dtype=np.float32))
    assert env.texts and not set(env.texts) & private  # none of the private run's notes
    with pytest.raises(DPLightningError, match="simulation_seed"):
        DPTrainingEnv(**SIM, simulation_seed=0, private_data_seed=0)


def test_simulator_poses_the_controllers_problem() -> None:
    """Same spaces as the controller, σ0 from the same calibration, and action 0 keeps σ0 and C0."""
    from dplightning.envs import DPTrainingEnv

    env = DPTrainingEnv(**SIM)
    assert env.observation_space.shape == (observation_size(),) and env.action_space.shape == (2,)
    obs, _ = env.reset(seed=3)
    assert obs[0] == 0.0 and obs[1] == 1.0  # progress 0, L/L0 = 1
    base = noise_for_target(8.0, 1e-5, env.q, 4, accountant="rdp")
    assert env.control.mapper.base_sigma == base
    _, r, done, _, info = env.step(np.zeros(2, dtype=np.float32))
    assert info["sigma"] == base and info["clip"] == 1.0 and not done
    assert r == pytest.approx(reward(env.control.losses[0], env.control.losses[1], env.control.losses[0]))
    _, _, done, _, info = env.step(np.array([1.0, 1.0], dtype=np.float32))
    assert done and info["clip"] == 1.5 and info["sigma"] == pytest.approx(base * 1.5)
    assert info["epsilon"] <= 8.0


def test_simulator_can_keep_the_real_runs_noise_per_averaged_gradient() -> None:
    """Given σ directly, the simulator uses it and its guard keeps exactly the ε that σ spends over the episode."""
    from dplightning.envs import DPTrainingEnv
    from dplightning.privacy.accounting import compute_epsilon

    env = DPTrainingEnv(**{k: v for k, v in SIM.items() if k != "target_epsilon"}, noise_multiplier=0.3)
    env.reset(seed=0)
    assert env.control.mapper.base_sigma == 0.3
    assert env.target_epsilon == compute_epsilon(0.3, env.q, SIM["episode_steps"], 1e-5, accountant="rdp")
    _, _, _, _, info = env.step(np.zeros(2, dtype=np.float32))
    assert info["sigma"] == 0.3
    with pytest.raises(DPLightningError, match="noise_multiplier must be > 0"):
        DPTrainingEnv(**SIM, noise_multiplier=0.0)
    # the pre-training script sets σ = σ/B × its batch unless asked for an ε
    pretrain = load_benchmark("rldp_pretrain")
    settings = pretrain.env_settings(pretrain.parse_args(["--sigma-over-batch", "0.004"]))
    assert settings["noise_multiplier"] == pytest.approx(0.004 * 32) and "target_epsilon" not in settings
    settings = pretrain.env_settings(pretrain.parse_args(["--target-epsilon", "8"]))
    assert settings["target_epsilon"] == 8.0 and "noise_multiplier" not in settings
    # the recipe's own return in the simulator: the zero action's episode, with nothing written
    quick = pretrain.env_settings(pretrain.parse_args(["--quick"]))
    result = pretrain.run(["--quick", "--recipe-episode", "--out", "/nonexistent/never.zip"])
    assert result["returns"] == [pretrain.recipe_episode(quick)] and result["policy"] is None


def test_pretraining_resumes_without_replay_and_the_policy_loads(tmp_path: Path) -> None:
    from conftest import load_benchmark

    pretrain = load_benchmark("rldp_pretrain")
    common = ["--quick", "--gradient-steps", "4", "--sac-batch-size", "4"]
    full = pretrain.run([*common, "--episodes", "2", "--out", str(tmp_path / "full.zip")])
    first = pretrain.run([*common, "--episodes", "1", "--out", str(tmp_path / "cut.zip")])
    resumed = pretrain.run([*common, "--episodes", "2", "--out", str(tmp_path / "cut.zip")])
    assert (full["episodes"], first["episodes"], resumed["episodes"]) == (2, 1, 2)
    assert resumed["resumed_from"] == 1 and resumed["returns"] == full["returns"]

    def state(name: str) -> dict[str, Any]:
        return torch.load(tmp_path / f"{name}.zip.state.pt", weights_only=False)

    a = RLDPAgent.from_state_dict(state("full")["agent"], observation_size(), 2, seed=0)
    b = RLDPAgent.from_state_dict(state("cut")["agent"], observation_size(), 2, seed=0)
    assert a.buffer_size == b.buffer_size == 4  # 2 decisions per episode
    for field in ("observations", "actions", "rewards", "dones"):
        np.testing.assert_array_equal(
            getattr(a.sac.replay_buffer, field)[:4], getattr(b.sac.replay_buffer, field)[:4]
        )
    for p, q in zip(a.sac.policy.parameters(), b.sac.policy.parameters()):
        assert torch.equal(p, q)  # agent and its random streams continued exactly
    rewards = a.sac.replay_buffer.rewards[:4, 0]
    assert not np.array_equal(
        rewards[:2], rewards[2:]
    )  # episode 2 (init, batches, noise) is not episode 1 again
    controller = RLDPController(policy_path=str(tmp_path / "cut.zip"), act="deterministic")
    controller.initialise(_fake_strategy(4.0, "rdp"))
    assert controller.agent is not None
    obs = np.zeros(observation_size(), dtype=np.float32)
    np.testing.assert_array_equal(controller.agent.act(obs, True), a.act(obs, True))
