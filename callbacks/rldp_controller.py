"""`RLDPController`: a Soft Actor-Critic agent that steers DP-SGD's clip norm (its step size) and σ.

RLDP (arXiv 2507.22565) inside Lightning: the training loop stays the driver. Every ``rl_interval`` optimizer
steps from ``warmup_steps`` on (step 0 included) the callback evaluates a fixed set of public examples, stores
the transition in the agent's replay buffer, trains the agent and applies its next action — after the budget
guard has checked it. The problem itself (action mapping, observation, reward) lives in
:mod:`dplightning.envs.rldp_core`, shared with the simulator that pre-trains a prior policy.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from dplightning.callbacks._controller import StrategyController
from dplightning.envs.rldp_agent import RLDPAgent
from dplightning.envs.rldp_core import (
    ActionMapper,
    BudgetGuard,
    ClipCountRelease,
    ControlState,
    UpdateStats,
    allocation_blocks,
    count_noise_source,
    count_noise_state,
    noisy_update,
    observation_size,
    optimizer_ratio,
    split_sigma,
)
from dplightning.errors import DPLightningError
from dplightning.privacy.count_release import count_noise_seed
from dplightning.strategies.base import short_group_name
from dplightning.strategies.protocol import PerExampleClippingStrategy

COUNT_CHANNEL = "rldp_clip_counts"
Act = Literal["sample", "deterministic"]


class RLDPController(StrategyController[PerExampleClippingStrategy]):
    """SAC hyper-policy over DP-SGD's clip norm and noise (use with ``DPSGDStrategy``, ideally SGD + momentum).

    The action is ``[a0, a1]`` (plus allocation weights), each in ``[-1, 1]``: ``C ← C·clip_step^a0`` within
    ``[C0/clip_range, C0·clip_range]``, ``σ = σ0·sigma_range^a1`` (σ0 calibrated for the budget, then only ever
    raised by the budget guard). Under SGD with every example clipped the update scales with lr·C, so ``a0`` moves
    the step size. Action 0 is the configured recipe exactly.

    Args:
        rl_interval: optimizer steps between decisions.
        warmup_steps: plain DP-SGD steps before the first decision (0: decide before the first step).
        act: which actions the private run applies. ``"sample"`` (default): samples of the policy, and the agent
            trains online — the critic can only learn how the loss responds to C and σ from actions that vary,
            and the small initial log-std keeps them near the recipe. ``"deterministic"``: the policy's mean, and
            no online training — for a pre-trained prior (``policy_path``); an untrained agent's mean is the
            recipe itself.
        clip_step: largest change of C per decision (×/÷).
        clip_range: C stays within ``[C0/clip_range, C0·clip_range]``.
        sigma_range: σ within ``[σ0/sigma_range, σ0·sigma_range]`` before the guard; ``σ0·sigma_range`` is the
            guard's σ_max.
        clip_allocation: ``None`` (default: one clip norm, the recipe's clipping), ``"lora_ab"`` (one weight for
            the LoRA A matrices, one for the B matrices; needs ``clipping: per_layer``) or a number of contiguous
            blocks of clipping groups; weights in ``[1/allocation_range, allocation_range]``, renormalised so the
            total sensitivity stays ≤ C.
        allocation_range: range of the allocation weights.
        learning_rate, buffer_size, batch_size, tau, gamma, ent_coef, initial_log_std, net_arch: SAC settings
            (see :class:`~dplightning.envs.rldp_agent.RLDPAgent`).
        gradient_steps: SAC updates per decision (many: a run has few decisions).
        learning_starts: transitions in the buffer before SAC updates start.
        count_budget_fraction: share of each step's privacy spent on noisy clip fractions (one per allocation
            block) added to the observation; 0 (default) releases nothing besides the gradient.
        public_batches: the fixed public evaluation set holds ``public_batches × eval_batch_size`` examples.
        policy_path: start from a pre-trained policy (zip from ``benchmarks/rldp_pretrain.py`` or
            ``save_policy_to``).
        save_policy_to: write the policy here (atomically) at the end and on every checkpoint.
        seed: seed of the agent and of the choice of public examples (both public); ``None`` (default) follows
            the run's seed (``seed_everything``), else 0. The count noise follows the strategy's secret ``seed``.
        action_scope: accepted for old configs and ignored (the per-adapter design is gone).
    """

    # Per-rank decisions would diverge under DDP; σ is set as a Gaussian multiplier; C must be a clip norm.
    requires_dpsgd = True
    requires_single_device = True
    requires_gaussian_noise = True

    def __init__(
        self,
        *,
        rl_interval: int = 10,
        warmup_steps: int = 0,
        act: Act = "sample",
        clip_step: float = 1.5,
        clip_range: float = 4.0,
        sigma_range: float = 1.5,
        clip_allocation: str | int | None = None,
        allocation_range: float = 2.0,
        learning_rate: float = 3e-4,
        buffer_size: int = 10_000,
        batch_size: int = 64,
        tau: float = 0.005,
        gamma: float = 1.0,
        ent_coef: float = 0.01,
        initial_log_std: float = -2.0,
        net_arch: tuple[int, ...] = (64, 64),
        gradient_steps: int = 64,
        learning_starts: int = 1,
        count_budget_fraction: float = 0.0,
        public_batches: int = 4,
        policy_path: str | None = None,
        save_policy_to: str | None = None,
        seed: int | None = None,
        action_scope: str | None = None,
    ) -> None:
        super().__init__()
        _check_arguments(
            rl_interval=rl_interval,
            warmup_steps=warmup_steps,
            act=act,
            clip_step=clip_step,
            clip_range=clip_range,
            sigma_range=sigma_range,
            allocation_range=allocation_range,
            gamma=gamma,
            ent_coef=ent_coef,
            gradient_steps=gradient_steps,
            learning_starts=learning_starts,
            count_budget_fraction=count_budget_fraction,
            public_batches=public_batches,
        )
        if policy_path is not None and not Path(policy_path).exists():
            raise DPLightningError(
                f"RLDPController: policy file '{policy_path}' not found; pre-train one with "
                "benchmarks/rldp_pretrain.py or save one with save_policy_to"
            )
        if action_scope is not None:
            warnings.warn(
                "RLDPController(action_scope=...) is ignored: the action is one clip norm and σ; use "
                "clip_allocation for per-group shares",
                DeprecationWarning,
                stacklevel=2,
            )
        self.rl_interval = rl_interval
        self.warmup_steps = warmup_steps
        self.act = act
        self.clip_step = float(clip_step)
        self.clip_range = float(clip_range)
        self.sigma_range = float(sigma_range)
        self.clip_allocation = clip_allocation
        self.allocation_range = float(allocation_range)
        self.sac_kwargs: dict[str, Any] = {
            "learning_rate": learning_rate,
            "buffer_size": buffer_size,
            "batch_size": batch_size,
            "tau": tau,
            "gamma": gamma,
            "ent_coef": float(ent_coef),
            "initial_log_std": initial_log_std,
            "net_arch": tuple(net_arch),
        }
        self.gradient_steps = gradient_steps
        self.learning_starts = learning_starts
        self.count_budget_fraction = float(count_budget_fraction)
        self.public_batches = public_batches
        self.policy_path = policy_path
        self.save_policy_to = save_policy_to
        self.seed = seed

        self.agent: RLDPAgent | None = None
        self.control: ControlState | None = None
        self.counts: ClipCountRelease | None = None
        self.updates = UpdateStats()
        self.sigma_count = math.inf
        self.decisions = 0
        self.stopped_on_budget = False
        self.public_indices: list[int] | None = None
        self._public_loader: DataLoader | None = None
        self._fixed_batches: list[Any] | None = None
        self._prev: dict[str, Any] | None = None  # obs, action, accountant step of the last decision
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
        datamodule = getattr(trainer, "datamodule", None)
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

    @property
    def resolved_seed(self) -> int:
        """The explicit seed, else the run's (``seed_everything`` sets ``PL_GLOBAL_SEED``), else 0."""
        if self.seed is not None:
            return int(self.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def initialise(self, strategy: PerExampleClippingStrategy) -> None:
        """Read the calibrated σ0 and thresholds, build the mapping, guard, count release and agent."""
        self.strategy = strategy
        saved = self._pending_state or {}
        seed = saved.get("seed", self.resolved_seed)
        self.seed = seed
        target = min(e for e in (strategy.target_epsilon, strategy.max_epsilon) if e is not None)
        assert strategy.noise_multiplier is not None and strategy.planned_steps is not None
        base_sigma = saved.get("base_sigma", strategy.noise_multiplier)
        base_thresholds = dict(saved.get("base_thresholds", strategy.clip_thresholds))
        blocks = allocation_blocks(strategy.group_names, self.clip_allocation)
        mapper = ActionMapper(
            base_sigma,
            base_thresholds,
            blocks,
            self.sigma_range,
            self.clip_range,
            self.clip_step,
            self.allocation_range,
        )
        guard = BudgetGuard(
            strategy.accountant,
            target,
            strategy.target_delta,
            float(strategy.sample_rate or 0.0),
            strategy.planned_steps,
            mapper.sigma_max,
        )
        self.control = ControlState(mapper, guard)
        count_blocks = 0
        if self.count_budget_fraction > 0:
            groups = blocks or [list(strategy.group_names)]
            count_blocks = len(groups)
            self.counts = ClipCountRelease(
                groups, float(strategy.expected_batch_size or 1.0), self._count_noise()
            )
        sizes = (observation_size(count_blocks), mapper.action_size)
        if "agent" in saved:
            self.agent = RLDPAgent.from_state_dict(saved["agent"], *sizes, seed=seed)
        elif self.policy_path is not None:
            self.agent = RLDPAgent.load(self.policy_path, *sizes, seed=seed)
        else:
            self.agent = RLDPAgent.create(*sizes, seed=seed, **self.sac_kwargs)
        if saved:
            self._restore(saved)
            self._pending_state = None
        if self.counts is not None:
            # Without a count channel the strategy is left exactly as calibrated (or as its checkpoint restored
            # it); with one, σ is split between gradient and counts from the first step on.
            self._apply(self.control.sigma, None)

    def _count_noise(self) -> Any:
        """The count-noise source; a resumed run continues the saved stream, since re-seeding would draw the
        noise of steps 1…k again and differencing the two releases of those counts removes it."""
        assert self.strategy is not None
        saved = self._pending_state or {}
        steps_done = max(saved.get("last_step", -1), 0)
        return count_noise_source(
            count_noise_seed(self.strategy.seed, "rldp"),  # not the agent's seed: that one is public
            self.strategy.secure_rng,
            saved.get("count_noise"),
            steps_done,
        )

    def _apply(self, sigma: float, thresholds: dict[str, float] | None) -> None:
        """Set thresholds, then σ (which sets every group's noise std to σ·C_total of the new thresholds). With
        a count channel the step's σ is split so gradient + counts cost exactly σ."""
        s = self.strategy
        assert s is not None
        if thresholds is not None:
            s.set_clip_thresholds(thresholds)
        if self.counts is None:
            s.set_noise_multiplier(sigma)
            return
        sigma_grad, self.sigma_count = split_sigma(sigma, self.count_budget_fraction)
        s.set_noise_multiplier(sigma_grad)
        s.auxiliary_noise_multipliers[COUNT_CHANNEL] = self.sigma_count

    def apply_action(self, action: np.ndarray) -> float | None:
        """Map ``action``, pass σ through the budget guard, apply to the strategy. Returns the σ used, or ``None``
        (nothing applied) when no σ ≤ σ_max keeps the budget."""
        assert self.control is not None and self.strategy is not None
        s = self.strategy
        remaining = max(int(s.planned_steps or 0) - s.accountant.steps, 1)
        decided = self.control.decide(action, min(self.rl_interval, remaining))
        if decided is None:
            return None
        sigma, thresholds = decided
        self._apply(sigma, thresholds)
        return sigma

    # ----------------------------------------------------------------------------------------- loop
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.strategy is not None:
            self._fixed_batches = self._build_fixed_batches(trainer)

    def _build_fixed_batches(self, trainer: pl.Trainer) -> list[Any]:
        """The same public examples at every decision, so rewards compare the model, not two batches (a seeded
        choice: the public split is in source order)."""
        loader = self._public_loader
        assert loader is not None
        dataset = loader.dataset
        size = len(dataset)  # type: ignore[arg-type]
        batch_size = loader.batch_size or 1
        saved = (self._pending_state or {}).get("public_indices")
        indices = saved if saved is not None else self.public_indices
        if indices is None:
            count = min(size, self.public_batches * batch_size)
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.resolved_seed))
            indices = sorted(order[:count].tolist())
        elif max(indices) >= size:
            raise DPLightningError(
                f"RLDPController's saved public examples go up to index {max(indices)}, but the public split "
                f"has {size}; resume with the data settings of the checkpointed run"
            )
        self.public_indices = list(indices)
        fixed = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=loader.collate_fn)
        return [trainer.strategy.batch_to_device(batch) for batch in fixed]

    @override
    def on_batch_start(self, trainer: pl.Trainer, strategy: PerExampleClippingStrategy) -> None:
        if self.control is None:
            self.initialise(strategy)
            if strategy.accountant.steps == 0 and self.warmup_steps == 0 and self._prev is None:
                self._decide(trainer, trainer.lightning_module, done=False)

    @override
    def on_step_released(self, trainer: pl.Trainer, strategy: PerExampleClippingStrategy, step: int) -> None:
        pl_module = trainer.lightning_module
        self.updates.record(noisy_update([p for p in pl_module.parameters() if p.requires_grad]))
        if self.counts is not None:
            # The clip counts of this step were paid for by the auxiliary channel in this step's σ_eff.
            self.counts.release(strategy.private_step_norms, strategy.clip_thresholds, self.sigma_count)
        strategy.private_step_norms = {}  # private: nothing else may read them
        if step >= self.warmup_steps and (step - self.warmup_steps) % self.rl_interval == 0:
            self._decide(trainer, pl_module, done=step >= int(strategy.planned_steps or 0))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        s = self.strategy
        if self._prev is not None and s is not None and s.accountant.steps != self._prev["step"]:
            self._decide(
                trainer, pl_module, done=True
            )  # stopped early: the run's last transition is terminal
        if self.save_policy_to and self.agent is not None and trainer.is_global_zero:
            self.agent.save(self.save_policy_to)

    def public_loss(self, pl_module: pl.LightningModule) -> float:
        """Mean per-example loss over the fixed public examples."""
        assert self._fixed_batches is not None, "on_train_start builds the fixed public batches"
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), pl_module.trainer.precision_plugin.forward_context():
                losses = [pl_module.per_example_loss(b).float() for b in self._fixed_batches]  # type: ignore[operator]
        finally:
            pl_module.train(was_training)
        return float(torch.cat(losses).mean())

    def _observe(self, trainer: pl.Trainer, loss: float) -> np.ndarray:
        s, control = self.strategy, self.control
        assert s is not None and control is not None and control.guard is not None
        noisy_norm = math.sqrt(sum(n * n for n in s.last_noisy_grad_norms.values()))  # public: of the release
        return control.observe(
            loss,
            progress=s.accountant.steps / max(int(s.planned_steps or 1), 1),
            epsilon_ratio=s.accountant.epsilon(s.target_delta) / control.guard.target_epsilon,
            cosine=self.updates.interval_mean(),
            log_optimizer_ratio=optimizer_ratio(trainer.optimizers[0], noisy_norm)
            if trainer.optimizers
            else 0.0,
            count_fractions=self.counts.interval_mean() if self.counts is not None else (),
        )

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, done: bool) -> None:
        s, control, agent = self.strategy, self.control, self.agent
        assert s is not None and control is not None and agent is not None
        loss = self.public_loss(pl_module)
        obs = self._observe(trainer, loss)
        metrics: dict[str, float] = {"rldp/public_loss": loss}
        if self._prev is not None:
            r = control.last_reward()
            metrics["rldp/reward"] = r
            agent.add(self._prev["obs"], obs, self._prev["action"], r, done)
            if self.act == "sample" and agent.buffer_size >= self.learning_starts:
                losses = agent.train(self.gradient_steps)
                metrics.update({f"rldp/sac_{k}": v for k, v in losses.items()})
        if not done:
            action = agent.act(obs, deterministic=self.act == "deterministic")
            used = self.apply_action(action)
            if used is None:
                self.stopped_on_budget = True
                trainer.should_stop = True
                rank_zero_info(
                    "[dplightning] RLDP: no σ within sigma_range keeps the budget; stopping cleanly"
                )
            else:
                self.decisions += 1
                metrics.update({"rldp/sigma": used, "rldp/clip": control.clip})
                metrics.update({f"rldp/action_{i}": float(a) for i, a in enumerate(action)})
                if control.mapper.blocks:
                    for g, c in s.clip_thresholds.items():
                        metrics[f"rldp/clip/{short_group_name(g)}"] = c
            self._prev = {"obs": obs, "action": action, "step": s.accountant.steps}
        else:
            self._prev = None  # the episode is over: on_train_end must not close it a second time
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    # ---------------------------------------------------------------------------------- persistence
    def save_policy(self, path: str | os.PathLike[str]) -> Path:
        """Write the SAC agent (policy, critics, optimizers) as an SB3 zip, atomically."""
        assert self.agent is not None
        return self.agent.save(path)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.agent is None or self.control is None:  # not started yet: pass the loaded state on
            return dict(self._pending_state or {})
        return {
            "seed": self.seed,
            "agent": self.agent.state_dict(),
            "control": self.control.state_dict(),
            "base_sigma": self.control.mapper.base_sigma,
            "base_thresholds": dict(self.control.mapper.base_thresholds),
            "updates": self.updates.state_dict(),
            "prev": self._prev,
            "decisions": self.decisions,
            "last_step": self._last_step,
            "public_indices": self.public_indices,
            "sigma_count": self.sigma_count,
            "count_noise": count_noise_state(self.counts.noise) if self.counts is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending_state = dict(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.control is not None and self.strategy is not None
        if "control" in state:
            self.control.load_state_dict(state["control"])
            self.updates.load_state_dict(state["updates"])
            self._prev, self.decisions = state["prev"], state["decisions"]
            self._last_step = state["last_step"]

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.save_policy_to and self.agent is not None and trainer.is_global_zero:
            self.agent.save(self.save_policy_to)


def _check_arguments(**kw: Any) -> None:
    """Refuse bad settings with one message naming the argument and the fix."""
    problems = [
        (kw["rl_interval"] < 1, f"rl_interval must be >= 1 step, got {kw['rl_interval']}; e.g. 10"),
        (kw["warmup_steps"] < 0, f"warmup_steps must be >= 0, got {kw['warmup_steps']}; e.g. 0"),
        (
            kw["act"] not in ("sample", "deterministic"),
            f"act must be 'sample' or 'deterministic', got {kw['act']!r}",
        ),
        (not kw["clip_step"] >= 1.0, f"clip_step must be >= 1, got {kw['clip_step']}; e.g. 1.5"),
        (not kw["clip_range"] >= 1.0, f"clip_range must be >= 1, got {kw['clip_range']}; e.g. 4"),
        (not kw["sigma_range"] >= 1.0, f"sigma_range must be >= 1, got {kw['sigma_range']}; e.g. 1.5"),
        (
            not kw["allocation_range"] >= 1.0,
            f"allocation_range must be >= 1, got {kw['allocation_range']}; e.g. 2",
        ),
        (not 0.0 < kw["gamma"] <= 1.0, f"gamma must be in (0, 1], got {kw['gamma']}; e.g. 1"),
        (
            not isinstance(kw["ent_coef"], (int, float)) or not kw["ent_coef"] >= 0,
            f"ent_coef must be a fixed number >= 0, got {kw['ent_coef']!r}; e.g. 0.01",
        ),
        (kw["gradient_steps"] < 1, f"gradient_steps must be >= 1, got {kw['gradient_steps']}; e.g. 64"),
        (kw["learning_starts"] < 1, f"learning_starts must be >= 1, got {kw['learning_starts']}; e.g. 1"),
        (
            not 0.0 <= kw["count_budget_fraction"] < 1.0,
            f"count_budget_fraction must be in [0, 1), got {kw['count_budget_fraction']}; e.g. 0 (no counts)",
        ),
        (kw["public_batches"] < 1, f"public_batches must be >= 1, got {kw['public_batches']}; e.g. 4"),
    ]
    for bad, message in problems:
        if bad:
            raise DPLightningError(f"RLDPController: {message}")
