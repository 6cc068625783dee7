"""`RLDPController`: an online Soft Actor-Critic agent that picks per-group clip thresholds and σ during DP-SGD.

RLDP (arXiv 2507.22565) inside Lightning: the training loop stays the driver. Every ``rl_interval`` optimizer
steps after ``warmup_steps`` of plain DP-SGD the callback observes training statistics, stores the transition in
the agent's replay buffer, runs ``gradient_steps`` SAC updates and applies the agent's next action to the
strategy — after the budget guard has checked it. See :mod:`dplightning.envs.rldp_core` for the observation,
action mapping, reward and guard, and the soundness argument.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from dplightning.callbacks._controller import StrategyController
from dplightning.checkpoint_io import atomic_write
from dplightning.envs.dp_training_env import DPTrainingEnv
from dplightning.envs.rldp_core import ActionMapper, action_groups, build_observation, reward
from dplightning.errors import DPLightningError
from dplightning.privacy.budget_guard import BudgetGuard
from dplightning.privacy.count_release import (
    ClipCountRelease,
    count_noise_source,
    count_noise_state,
    split_sigma,
)
from dplightning.privacy.noise_addition import NoiseSource
from dplightning.strategies.base import short_group_name
from dplightning.strategies.protocol import PerExampleClippingStrategy

COUNT_CHANNEL = "rldp_clip_counts"


class RLDPController(StrategyController[PerExampleClippingStrategy]):
    """Online SAC hyper-policy over DP-SGD's clipping thresholds and noise (use with ``DPSGDStrategy``).

    Args:
        rl_interval: optimizer steps between decisions.
        warmup_steps: plain DP-SGD steps before the agent acts.
        action_scope: ``"per_adapter"`` (one clip multiplier per clipping group), ``"per_layer_group"``
            (``num_layer_groups`` contiguous blocks; transfers across models) or ``"global"``.
        num_layer_groups: blocks for ``per_layer_group``.
        learning_rate, buffer_size, batch_size, tau, gamma, ent_coef, gradient_steps: SAC hyper-parameters.
        learning_starts: transitions in the buffer before SAC updates start.
        reward_privacy_weight: λ in ``reward = ΔL_public − λ·Δε``.
        sigma_bounds: range of the σ multiplier (relative to the calibrated σ); its top is the guard's σ_max.
        clip_bounds: range of the clip-threshold multipliers (relative to the initial thresholds).
        count_budget_fraction: share of each step's privacy used to release noisy clip fractions.
        public_batches: batches of the public split evaluated per decision (held-out loss for the reward).
        policy_path: load a pre-trained SAC policy (zip) instead of starting from scratch.
        save_policy_to: write the policy here (atomically) at the end and on every checkpoint.
        deterministic: act with the policy's mean (evaluation / transfer) and do not train the agent.
        seed: seed of the agent and of the clip-count noise; with the strategy's ``secure_rng`` the count
            noise comes from the OS CSPRNG instead.
    """

    # DP-ZO has no per-example norms to count; per-rank decisions would diverge under DDP; the clip counts are
    # accounted as a Gaussian channel of the step.
    requires_dpsgd = True
    requires_single_device = True
    requires_gaussian_noise = True

    def __init__(
        self,
        rl_interval: int = 10,
        warmup_steps: int = 20,
        action_scope: Literal["per_adapter", "per_layer_group", "global"] = "per_adapter",
        num_layer_groups: int = 4,
        learning_rate: float = 3e-4,
        buffer_size: int = 10_000,
        batch_size: int = 64,
        tau: float = 0.005,
        gamma: float = 0.99,
        ent_coef: str | float = "auto",
        gradient_steps: int = 1,
        learning_starts: int = 4,
        reward_privacy_weight: float = 0.1,
        sigma_bounds: tuple[float, float] = (0.7, 1.5),
        clip_bounds: tuple[float, float] = (0.25, 4.0),
        count_budget_fraction: float = 0.05,
        public_batches: int = 1,
        policy_path: str | None = None,
        save_policy_to: str | None = None,
        deterministic: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if rl_interval < 1 or warmup_steps < 0:
            raise DPLightningError("rl_interval must be >= 1 and warmup_steps >= 0")
        if not (0 < sigma_bounds[0] <= 1.0 <= sigma_bounds[1]) or not (0 < clip_bounds[0] <= clip_bounds[1]):
            raise DPLightningError(
                f"sigma_bounds {sigma_bounds} must contain 1 and clip_bounds {clip_bounds} be positive and ordered"
            )
        if policy_path is not None and not Path(policy_path).exists():
            raise DPLightningError(
                f"policy file '{policy_path}' not found; train one with save_policy_to first"
            )
        self.rl_interval = rl_interval
        self.warmup_steps = warmup_steps
        self.action_scope = action_scope
        self.num_layer_groups = num_layer_groups
        self.sac_kwargs: dict[str, Any] = {
            "learning_rate": learning_rate,
            "buffer_size": buffer_size,
            "batch_size": batch_size,
            "tau": tau,
            "gamma": gamma,
            "ent_coef": ent_coef,
            "gradient_steps": gradient_steps,
        }
        self.learning_starts = learning_starts
        self.reward_privacy_weight = reward_privacy_weight
        self.sigma_bounds = (float(sigma_bounds[0]), float(sigma_bounds[1]))
        self.clip_bounds = (float(clip_bounds[0]), float(clip_bounds[1]))
        self.count_budget_fraction = count_budget_fraction
        self.public_batches = public_batches
        self.policy_path = policy_path
        self.save_policy_to = save_policy_to
        self.deterministic = deterministic
        self.seed = seed

        self.agent: Any = None
        self.mapper: ActionMapper | None = None
        self.guard: BudgetGuard | None = None
        self.counts: ClipCountRelease | None = None
        self.sigma_count = 0.0
        self.decisions = 0
        self.stopped_on_budget = False
        self._public_iter: Iterator[Any] | None = None
        self._public_loader: Any = None
        self._last_step = -1
        self._prev: dict[str, Any] | None = None  # obs, action, public loss, ε at the last decision
        self._initial_loss: float | None = None
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ setup
    @override
    def attach(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, strategy: PerExampleClippingStrategy
    ) -> None:
        if strategy.target_epsilon is None and strategy.max_epsilon is None:
            raise DPLightningError("RLDPController needs a privacy budget; set the strategy's target_epsilon")
        if not hasattr(pl_module, "per_example_loss"):
            raise DPLightningError(
                "RLDPController needs a module with per_example_loss(batch) (e.g. DPLoRAModule)"
            )
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "public_dataloader"):
            raise DPLightningError(
                "RLDPController needs a data module with a public split; use TextDataModule"
            )
        try:
            self._public_loader = datamodule.public_dataloader()
        except DPLightningError as exc:
            raise DPLightningError(
                "RLDPController evaluates its reward on data declared public; set data.public_fraction > 0"
            ) from exc

    def initialise(self, strategy: PerExampleClippingStrategy) -> None:
        """Read the calibrated σ and initial thresholds, build mapper, guard, count release and agent."""
        from stable_baselines3 import SAC
        from stable_baselines3.common.logger import configure

        self.strategy = strategy
        target = min(e for e in (strategy.target_epsilon, strategy.max_epsilon) if e is not None)
        base_sigma = strategy.effective_noise_multiplier
        groups = action_groups(strategy.group_names, self.action_scope, self.num_layer_groups)
        self.mapper = ActionMapper(
            base_sigma, dict(strategy.clip_thresholds), groups, self.sigma_bounds, self.clip_bounds
        )
        self.guard = BudgetGuard(
            strategy.accountant,
            target,
            strategy.target_delta,
            strategy.sample_rate,
            strategy.planned_steps,
            self.mapper.sigma_max,
        )
        self.counts = ClipCountRelease(groups, strategy.expected_batch_size, self._count_noise(strategy))
        self._apply_sigma(base_sigma)
        env = DPTrainingEnv(mode="live", num_groups=len(groups))
        if self.policy_path is not None:
            self.agent = SAC.load(self.policy_path, env=env, device="cpu")
            if self.agent.observation_space.shape != env.observation_space.shape:
                raise DPLightningError(
                    f"policy '{self.policy_path}' expects {self.agent.action_space.shape[0] - 1} action groups, this run "
                    f"has {len(groups)}; use action_scope=per_layer_group or global to transfer across models"
                )
        else:
            self.agent = SAC(
                "MlpPolicy",
                env,
                learning_starts=0,
                seed=self.seed,
                device="cpu",
                policy_kwargs={"net_arch": [64, 64]},
                **self.sac_kwargs,
            )
        self.agent.set_logger(configure(None, []))
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    def _count_noise(self, strategy: PerExampleClippingStrategy) -> NoiseSource:
        """The count-noise source; a resumed run continues the saved stream, since re-seeding would draw the
        noise of steps 1…k again and differencing the two releases of those counts removes it."""
        saved = self._pending_state or {}
        steps_done = max(saved.get("last_step", -1), 0)
        return count_noise_source(self.seed + 7919, strategy.secure_rng, saved.get("count_noise"), steps_done)

    def _apply_sigma(self, sigma: float) -> None:
        """Split σ between the gradient and the clip counts so the step costs exactly σ."""
        sigma_grad, self.sigma_count = split_sigma(sigma, self.count_budget_fraction)
        assert self.strategy is not None
        self.strategy.set_noise_multiplier(sigma_grad)
        self.strategy.auxiliary_noise_multipliers[COUNT_CHANNEL] = self.sigma_count

    def apply_action(self, action: np.ndarray) -> float | None:
        """Map ``action`` ``[k+1]``, pass σ through the budget guard, apply to the strategy. Returns the σ used,
        or ``None`` (and nothing applied) when no σ ≤ σ_max keeps the budget."""
        assert self.mapper is not None and self.guard is not None and self.strategy is not None
        sigma, clips = self.mapper(action)
        safe = self.guard.safe_sigma(sigma, self.rl_interval)
        if safe is None:
            return None
        self.strategy.set_clip_thresholds(clips)
        self._apply_sigma(safe)
        return safe

    # ----------------------------------------------------------------------------------------- loop
    @override
    def on_batch_start(self, trainer: pl.Trainer, strategy: PerExampleClippingStrategy) -> None:
        if self.mapper is None:
            self.initialise(strategy)

    @override
    def on_step_released(self, trainer: pl.Trainer, strategy: PerExampleClippingStrategy, step: int) -> None:
        assert self.counts is not None
        # The clip counts of this step were paid for by the auxiliary channel in this step's σ_eff.
        self.counts.release(strategy.private_step_norms, strategy.clip_thresholds, self.sigma_count)
        strategy.private_step_norms = {}
        if step >= self.warmup_steps and (step - self.warmup_steps) % self.rl_interval == 0:
            self._decide(trainer, trainer.lightning_module, done=step >= strategy.planned_steps)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self._prev is not None
            and self.strategy is not None
            and self.strategy.accountant.steps != self._prev["step"]
        ):
            self._decide(trainer, pl_module, done=True)
        if self.save_policy_to and self.agent is not None and trainer.is_global_zero:
            self.save_policy(self.save_policy_to)

    def _public_loss(self, pl_module: pl.LightningModule) -> float:
        if self._public_iter is None:
            self._public_iter = iter(self._public_loader)
        was_training = pl_module.training
        pl_module.eval()
        losses = []
        with torch.no_grad():
            for _ in range(self.public_batches):
                try:
                    batch = next(self._public_iter)
                except StopIteration:
                    self._public_iter = iter(self._public_loader)
                    batch = next(self._public_iter)
                batch = pl_module.trainer.strategy.batch_to_device(batch)
                losses.append(pl_module.per_example_loss(batch))
        pl_module.train(was_training)
        return float(torch.cat(losses).mean())

    def _observation(self, loss: float, prev_loss: float) -> np.ndarray:
        assert self.mapper is not None and self.counts is not None and self.strategy is not None
        s = self.strategy
        groups = self.mapper.groups
        clips = [np.mean([s.clip_thresholds[g] / self.mapper.base_clips[g] for g in m]) for m in groups]
        norms = [
            np.mean([s.last_noisy_grad_norms.get(g, 0.0) / s.clip_thresholds[g] for g in m])
            * s.expected_batch_size
            for m in groups
        ]
        assert self.guard is not None and self._initial_loss is not None
        return build_observation(
            loss,
            prev_loss,
            self._initial_loss,
            s.accountant.epsilon(s.target_delta) / self.guard.target_epsilon,
            s.accountant.steps / s.planned_steps,
            s.effective_noise_multiplier / self.mapper.base_sigma,
            clips,
            self.counts.interval_mean(),
            norms,
        )

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, done: bool) -> None:
        s = self.strategy
        assert s is not None
        loss = self._public_loss(pl_module)
        if self._initial_loss is None:
            self._initial_loss = loss
        eps = s.accountant.epsilon(s.target_delta)
        prev_loss = self._prev["loss"] if self._prev else loss
        obs = self._observation(loss, prev_loss)
        metrics: dict[str, float] = {"rldp/public_loss": loss}
        if self._prev is not None:
            r = reward(self._prev["loss"], loss, eps - self._prev["eps"], self.reward_privacy_weight)
            metrics["rldp/reward"] = r
            self.agent.replay_buffer.add(
                self._prev["obs"][None],
                obs[None],
                self._prev["action"][None],
                np.array([r]),
                np.array([done]),
                [{}],
            )
            if not self.deterministic and self.agent.replay_buffer.size() >= self.learning_starts:
                self.agent.train(
                    gradient_steps=self.sac_kwargs["gradient_steps"], batch_size=self.sac_kwargs["batch_size"]
                )
                for key in ("train/actor_loss", "train/critic_loss", "train/ent_coef"):
                    if key in self.agent.logger.name_to_value:
                        metrics[f"rldp/sac_{key.split('/')[1]}"] = float(self.agent.logger.name_to_value[key])
        if not done:
            action, _ = self.agent.predict(obs, deterministic=self.deterministic)
            used = self.apply_action(action)
            if used is None:
                self.stopped_on_budget = True
                trainer.should_stop = True
                rank_zero_info(
                    "[dplightning] RLDP: no σ within sigma_bounds keeps the budget; stopping cleanly"
                )
            else:
                self.decisions += 1
                metrics["rldp/sigma"] = used
                metrics.update({f"rldp/action_{i}": float(a) for i, a in enumerate(action)})
                for g, c in s.clip_thresholds.items():
                    metrics[f"rldp/clip/{short_group_name(g)}"] = c
                for i, f in enumerate(obs[5 + len(self.mapper.groups) : 5 + 2 * len(self.mapper.groups)]):
                    metrics[f"rldp/clip_fraction_{i}"] = float(f)
            self._prev = {
                "obs": obs,
                "action": np.asarray(action, dtype=np.float32),
                "loss": loss,
                "eps": eps,
                "step": s.accountant.steps,
            }
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    # ---------------------------------------------------------------------------------- persistence
    def policy_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.agent.save(buf)
        return buf.getvalue()

    def save_policy(self, path: str | os.PathLike[str]) -> Path:
        """Write the SAC agent (policy, critics, optimizers) as an SB3 zip, atomically."""
        data = self.policy_bytes()
        return atomic_write(path, lambda fh: fh.write(data))

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.agent is None:  # not started yet (e.g. saved right after a resume): pass the loaded state on
            return dict(self._pending_state or {})
        replay = io.BytesIO()
        self.agent.save_replay_buffer(replay)
        return {
            "agent": self.policy_bytes(),
            "replay_buffer": replay.getvalue(),
            "prev": self._prev,
            "initial_loss": self._initial_loss,
            "decisions": self.decisions,
            "last_step": self._last_step,
            "base_sigma": self.mapper.base_sigma if self.mapper else None,
            "base_clips": dict(self.mapper.base_clips) if self.mapper else None,
            "sigma_count": self.sigma_count,
            "count_noise": count_noise_state(self.counts.noise) if self.counts is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending_state = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        from stable_baselines3 import SAC
        from stable_baselines3.common.logger import configure

        env = DPTrainingEnv(mode="live", num_groups=len(self.mapper.groups) if self.mapper else 1)
        self.agent = SAC.load(io.BytesIO(state["agent"]), env=env, device="cpu")
        self.agent.set_logger(configure(None, []))
        self.agent.load_replay_buffer(io.BytesIO(state["replay_buffer"]))
        self._prev, self._initial_loss = state["prev"], state["initial_loss"]
        self.decisions, self._last_step = state["decisions"], state["last_step"]
        if self.mapper is not None and state["base_sigma"] is not None:
            self.mapper.base_sigma, self.mapper.base_clips = state["base_sigma"], dict(state["base_clips"])
            self.guard.sigma_max = self.mapper.sigma_max  # type: ignore[union-attr]
        self.sigma_count = state["sigma_count"]
        assert self.strategy is not None
        self.strategy.auxiliary_noise_multipliers[COUNT_CHANNEL] = self.sigma_count

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.save_policy_to and self.agent is not None and trainer.is_global_zero:
            self.save_policy(self.save_policy_to)
