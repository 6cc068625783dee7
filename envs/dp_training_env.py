"""`DPTrainingEnv`: a simulator of the RLDP problem on public text, for pre-training a prior policy.

Each episode is a small DP-SGD LoRA fine-tune run the way ``DPSGDStrategy`` runs it — the same model, LoRA,
optimizer, clipping groups, Poisson sampling, integer-grid clipping and discrete Gaussian noise, and σ calibrated
for the episode's budget by the same function — at a size a CPU manages (by default batch 32 and 30 steps per
episode). Observation, action and reward are the controller's (:mod:`dplightning.envs.rldp_core`), so a policy
pre-trained here loads into :class:`~dplightning.callbacks.RLDPController` via ``policy_path``.

Data: pseudo-clinical notes generated from ``simulation_seed``, which must differ from the private run's
``private_data_seed``; only the *public* split of that simulated data set is read (training batches and the
fixed evaluation set are disjoint parts of it), never a training split. Nothing private enters the simulator,
so pre-training costs no privacy.

Spaces: action ``Box(-1, 1, (2+m,))`` (clip-norm step, σ, ``m`` allocation weights); observation
``Box(-10, 10, (8+k,))`` with the layout of :data:`dplightning.envs.rldp_core.OBS_FIELDS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from dplightning.envs.rldp_agent import make_spaces
from dplightning.envs.rldp_core import (
    ActionMapper,
    BudgetGuard,
    ClipCountRelease,
    ControlState,
    UpdateStats,
    allocation_blocks,
    noisy_update,
    observation_size,
    optimizer_ratio,
    split_sigma,
)
from dplightning.errors import DPLightningError
from dplightning.privacy.accounting import compute_epsilon, make_accountant, noise_for_target
from dplightning.privacy.batch_selection import PoissonBatchSampler
from dplightning.privacy.clipping import clip_to_grid_and_sum, group_grids, make_groups
from dplightning.privacy.discretization import from_grid
from dplightning.privacy.noise_addition import NoiseSource
from dplightning.privacy.per_example_grads import PerExampleGradients


class DPTrainingEnv(gym.Env):
    """RLDP's simulator (see module docstring). Keyword-only arguments:

    Args:
        model_name, lora_rank, lora_alpha, lora_target_modules, optimizer, momentum, learning_rate: the model and
            optimizer, as ``DPLoRAModule`` takes them (defaults: the SGD recipe).
        max_grad_norm, clipping: the recipe's clip norm C0 and clipping mode.
        num_records, max_length, batch_size: simulated data set size, tokens per note, expected Poisson batch.
        eval_examples: size of the fixed public evaluation set (the reward's).
        episode_steps, rl_interval: DP-SGD steps per episode and between decisions.
        target_epsilon, delta, accountant: the episode's budget and its accounting.
        noise_multiplier: the recipe's σ, given directly instead of calibrated from ``target_epsilon`` (which is
            then the ε that σ spends over the episode). A reduced simulator (a smaller batch, fewer steps) should
            keep the real run's noise per averaged gradient σ/B, not its ε: at batch 32 the real run's ε would
            give about four times its σ/B, a regime where every step hurts.
        clip_step, clip_range, sigma_range, clip_allocation, allocation_range, count_budget_fraction: the
            action mapping and observation, as ``RLDPController`` takes them (must match to load the policy).
        simulation_seed: data seed of the simulated notes; private_data_seed: the private run's (refused if equal).
        seed: seed of the episodes (LoRA init, Poisson batches, noise); episode ``e`` uses ``seed·1000 + e``.
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium declares it an instance attribute)

    def __init__(
        self,
        *,
        model_name: str = "smollm2-135m",
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_target_modules: Sequence[str] | None = ("q_proj", "v_proj"),
        optimizer: str = "sgd",
        momentum: float = 0.9,
        learning_rate: float = 0.5,
        max_grad_norm: float = 1.0,
        clipping: str = "flat",
        num_records: int = 2500,
        max_length: int = 32,
        batch_size: int = 32,
        eval_examples: int = 64,
        episode_steps: int = 30,
        rl_interval: int = 5,
        target_epsilon: float = 8.0,
        delta: float = 1e-5,
        accountant: str = "rdp",
        noise_multiplier: float | None = None,
        clip_step: float = 1.5,
        clip_range: float = 4.0,
        sigma_range: float = 1.5,
        clip_allocation: str | int | None = None,
        allocation_range: float = 2.0,
        count_budget_fraction: float = 0.0,
        simulation_seed: int = 1,
        private_data_seed: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if simulation_seed == private_data_seed:
            raise DPLightningError(
                f"DPTrainingEnv: simulation_seed {simulation_seed} is the private run's data seed; pick another so "
                "the simulator's notes are not the private ones"
            )
        if episode_steps < 1 or rl_interval < 1 or eval_examples < 1:
            raise DPLightningError(
                "DPTrainingEnv: episode_steps, rl_interval and eval_examples must be >= 1; e.g. 30, 5 and 64"
            )
        self.model_kwargs: dict[str, Any] = {
            "model_name": model_name,
            "lora_rank": lora_rank,
            "lora_alpha": lora_alpha,
            "lora_target_modules": list(lora_target_modules) if lora_target_modules else None,
            "optimizer": optimizer,
            "momentum": momentum,
            "learning_rate": learning_rate,
        }
        self.max_grad_norm = max_grad_norm
        self.clipping = clipping
        self.batch_size = batch_size
        self.episode_steps = episode_steps
        self.rl_interval = rl_interval
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.accountant_kind = accountant
        self.mapping_kwargs = {
            "sigma_range": sigma_range,
            "clip_range": clip_range,
            "clip_step": clip_step,
            "allocation_range": allocation_range,
        }
        self.clip_allocation = clip_allocation
        self.count_budget_fraction = count_budget_fraction
        self.simulation_seed = simulation_seed
        self.seed = seed
        self.episode = 0
        self._load_data(model_name, num_records, max_length, eval_examples)
        self.q = batch_size / len(self.train_ids)
        self.noise_multiplier = noise_multiplier
        if noise_multiplier is not None:
            if not noise_multiplier > 0:
                raise DPLightningError(
                    f"DPTrainingEnv: noise_multiplier must be > 0, got {noise_multiplier}; e.g. 0.15"
                )
            # the budget the guard keeps: what σ spends over the episode
            self.target_epsilon = compute_epsilon(
                noise_multiplier,
                self.q,
                episode_steps,
                delta,
                accountant=accountant,  # type: ignore[arg-type]
            )
        self._build_episode(seed * 1000)  # the spaces depend on the model's clipping groups
        self.observation_space, self.action_space = make_spaces(
            self._obs_size, self.control.mapper.action_size
        )

    # ------------------------------------------------------------------------------------------ data
    def _load_data(self, model_name: str, num_records: int, max_length: int, eval_examples: int) -> None:
        """Tokenised public notes of the simulated data set: training pool and fixed evaluation set."""
        from dplightning.data import TextDataModule
        from dplightning.data.collate import CausalLMCollator

        data = TextDataModule(
            tokenizer=model_name,
            num_records=num_records,
            max_length=max_length,
            val_fraction=0.05,
            test_fraction=0.05,
            public_fraction=0.85,
            data_seed=self.simulation_seed,
        )
        texts = data.public_texts  # the public split only: the simulator never reads a training split
        order = np.random.default_rng(self.simulation_seed).permutation(len(texts))
        if len(texts) <= eval_examples + self.batch_size:
            raise DPLightningError(
                f"DPTrainingEnv: {len(texts)} public notes are too few for {eval_examples} evaluation examples "
                "and a batch; raise num_records"
            )
        ids = data._tokenize(texts)  # the data module's own tokenisation (eos, truncation), as in a real run
        self.texts = texts
        self.eval_ids = [ids[i] for i in sorted(order[:eval_examples])]
        self.train_ids = [ids[i] for i in sorted(order[eval_examples:])]
        pad = data.tokenizer.pad_token_id
        self.collate = CausalLMCollator(pad if pad is not None else 0, max_length)

    def _batch(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        return self.collate([{"input_ids": list(x)} for x in ids])

    # --------------------------------------------------------------------------------------- episode
    def _build_episode(self, run_seed: int) -> None:
        from dplightning.module import DPLoRAModule

        self.module = DPLoRAModule(**self.model_kwargs, seed=run_seed % 2**31)
        self.module.train()
        self.optimizer = self.module.configure_optimizers()  # the recipe's constant-rate optimizer
        self.engine = PerExampleGradients(self.module, loss_reduction="mean")
        self.params = dict(self.module.named_parameters())
        self.trainable = [self.params[n] for n in self.engine.param_names]
        self.groups = make_groups(self.engine.param_names, self.clipping)  # type: ignore[arg-type]
        thresholds = dict.fromkeys(self.groups, self.max_grad_norm / math.sqrt(len(self.groups)))
        self.total_steps = self.episode_steps
        self.accountant = make_accountant(self.accountant_kind)  # type: ignore[arg-type]
        self.noise = NoiseSource(seed=run_seed)
        self.sampler = PoissonBatchSampler(len(self.train_ids), self.q, seed=run_seed)
        base_sigma = self.noise_multiplier or noise_for_target(
            self.target_epsilon,
            self.delta,
            self.q,
            self.total_steps,
            accountant=self.accountant_kind,  # type: ignore[arg-type]
        )
        blocks = allocation_blocks(list(self.groups), self.clip_allocation)
        mapper = ActionMapper(base_sigma, thresholds, blocks, **self.mapping_kwargs)
        guard = BudgetGuard(
            self.accountant, self.target_epsilon, self.delta, self.q, self.total_steps, mapper.sigma_max
        )
        self.control = ControlState(mapper, guard)
        self.thresholds = thresholds
        self.counts: ClipCountRelease | None = None
        if self.count_budget_fraction > 0:
            self.counts = ClipCountRelease(
                blocks or [list(self.groups)], float(self.batch_size), NoiseSource(seed=run_seed + 1)
            )
        self._obs_size = observation_size(len(self.counts.groups) if self.counts is not None else 0)
        self.updates = UpdateStats()
        self.eval_batches = [self._batch(self.eval_ids[i : i + 64]) for i in range(0, len(self.eval_ids), 64)]

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self.seed, self.episode = seed, 0
        self._build_episode(self.seed * 1000 + self.episode)
        self.episode += 1
        return self._observe(), {}

    def public_loss(self) -> float:
        self.module.eval()
        with torch.no_grad():
            losses = [self.module.per_example_loss(b).float() for b in self.eval_batches]
        self.module.train()
        return float(torch.cat(losses).mean())

    def _observe(self) -> np.ndarray:
        return self.control.observe(
            self.public_loss(),
            progress=self.accountant.steps / self.total_steps,
            epsilon_ratio=self.accountant.epsilon(self.delta) / self.target_epsilon,
            cosine=self.updates.interval_mean(),
            log_optimizer_ratio=optimizer_ratio(self.optimizer),
            count_fractions=self.counts.interval_mean() if self.counts is not None else (),
        )

    def _next_batch(self) -> np.ndarray:
        """The Poisson batch of the next step; past one epoch the sampler moves to fresh masks (never a replay)."""
        epoch, index = divmod(self.accountant.steps, self.sampler.num_batches)
        self.sampler.set_epoch(epoch)
        return self.sampler.logical_batch(index)

    def _private_step(self, sigma: float) -> None:
        """One DP-SGD step as ``DPSGDStrategy`` releases it: clipped sums on the integer grid, discrete Gaussian
        noise of std σ·C_total per group, divided by the expected batch size, then the optimizer step."""
        sigma_grad, sigma_count = (
            (sigma, math.inf) if self.counts is None else split_sigma(sigma, self.count_budget_fraction)
        )
        batch = self._next_batch()
        names = self.engine.param_names
        sums = {n: torch.zeros(self.params[n].shape, dtype=torch.int64) for n in names}
        norms: dict[str, torch.Tensor] = {}
        grids = group_grids(self.groups, {n: self.params[n].numel() for n in names}, self.thresholds)
        self.optimizer.zero_grad(set_to_none=True)
        if len(batch):
            self.engine.expected_batch_size = len(batch)
            self.module.per_example_loss(self._batch([self.train_ids[i] for i in batch])).mean().backward()
            summed, norms = clip_to_grid_and_sum(self.engine.pop(), self.groups, self.thresholds, grids)
            sums.update(summed)
        c_total = math.sqrt(sum(c * c for c in self.thresholds.values()))
        padded = sigma_grad * (1.0 + 1e-12)  # as set_noise_multiplier pads it
        for g, members in self.groups.items():
            std = padded * c_total / self.thresholds[g] * self.thresholds[g] / grids[g]
            for n in members:
                units = sums[n] + self.noise.discrete_gaussian(sums[n].shape, std)
                self.params[n].grad = (from_grid(units, grids[g]) / self.batch_size).to(self.params[n].dtype)
        self.optimizer.step()
        self.updates.record(noisy_update(self.trainable))
        if self.counts is not None:
            self.counts.release(norms, self.thresholds, sigma_count)
        sigma_eff = padded if self.counts is None else (sigma_grad**-2 + sigma_count**-2) ** -0.5
        self.accountant.step(sigma_eff, self.q)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        remaining = self.total_steps - self.accountant.steps
        decided = self.control.decide(action, min(self.rl_interval, max(remaining, 1)))
        if decided is None:  # budget exhausted: end the episode without spending more
            eps = self.accountant.epsilon(self.delta)
            obs = self._observe()
            return obs, 0.0, True, False, {"epsilon": eps, "stopped_on_budget": True}
        sigma, self.thresholds = decided
        for _ in range(min(self.rl_interval, remaining)):
            self._private_step(sigma)
        obs = self._observe()
        eps = self.accountant.epsilon(self.delta)
        terminated = self.accountant.steps >= self.total_steps
        info = {
            "sigma": sigma,
            "clip": self.control.clip,
            "epsilon": eps,
            "public_loss": self.control.losses[-1],
        }
        return obs, self.control.last_reward(), terminated, False, info
