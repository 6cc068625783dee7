"""`DPTrainingEnv`: the RLDP control problem as a Gymnasium environment.

Two modes:

- ``mode="standalone"`` (default): ``step`` runs ``rl_interval`` real DP-SGD steps (Poisson sampling,
  per-group clipping, Gaussian noise, accountant) on a small model and dataset built from the kwargs, so
  ``gymnasium.utils.env_checker.check_env`` and ``SAC("MlpPolicy", env).learn(...)`` work, and a policy can be
  pre-trained offline and transferred.
- ``mode="live"``: only the spaces; :class:`dplightning.callbacks.RLDPController` drives a real Lightning run
  and feeds the agent itself (the Lightning loop stays the driver).

Spaces (``k`` action groups): action ``Box(-1, 1, (k+1,))`` = k log-clip multipliers and one log-σ multiplier;
observation ``Box(-10, 10, (5+3k,))`` with the layout of :data:`dplightning.envs.rldp_core.OBS_FIELDS`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from dplightning.envs.rldp_core import (
    OBS_LIMIT,
    ActionMapper,
    BudgetGuard,
    ClipCountRelease,
    build_observation,
    observation_size,
    reward,
    split_sigma,
)
from dplightning.privacy.accounting import make_accountant, noise_for_target
from dplightning.privacy.batch_selection import PoissonBatchSampler
from dplightning.privacy.clipping import clip_to_grid_and_sum, group_grids
from dplightning.privacy.discretization import from_grid
from dplightning.privacy.noise_addition import NoiseSource
from dplightning.privacy.per_example_grads import PerExampleGradients


def make_spaces(num_groups: int) -> tuple[spaces.Box, spaces.Box]:
    """(observation space ``[5+3k]``, action space ``[k+1]``)."""
    obs = spaces.Box(-OBS_LIMIT, OBS_LIMIT, shape=(observation_size(num_groups),), dtype=np.float32)
    act = spaces.Box(-1.0, 1.0, shape=(num_groups + 1,), dtype=np.float32)
    return obs, act


class _Task:
    """A small private learning problem: an MLP classifier on Gaussian blobs; each Linear layer is a group."""

    def __init__(
        self, num_groups: int, num_examples: int, dim: int, seed: int, private_seed: int | None = None
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(4, dim, generator=g) * 1.5

        def sample(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, 4, (n,), generator=gen)
            return centers[y] + torch.randn(n, dim, generator=gen), y

        self.public_x, self.public_y = sample(256, g)  # declared public: drawn apart from the private set
        private_gen = torch.Generator().manual_seed(
            seed + 1 if private_seed is None else 10**6 + private_seed
        )
        self.x, self.y = sample(num_examples, private_gen)
        torch.manual_seed(seed)
        widths = [dim] + [32] * (num_groups - 1) + [4]
        layers: list[nn.Module] = []
        for i in range(num_groups):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < num_groups - 1:
                layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model(x), y)

    def public_loss(self) -> float:
        with torch.no_grad():
            return float(self.loss(self.public_x, self.public_y))


class DPTrainingEnv(gym.Env):
    """RLDP as an MDP over training statistics (see module docstring).

    Args:
        mode: ``"standalone"`` or ``"live"``.
        num_groups: ``k``, the number of action groups (standalone: one per Linear layer of the task model).
        rl_interval: private optimizer steps per env step.
        episode_steps: env steps per episode (the planned run is ``episode_steps·rl_interval`` DP steps).
        target_epsilon, delta: the episode's privacy budget (standalone).
        sigma_bounds, clip_bounds: multiplier ranges of the action mapping.
        reward_privacy_weight: λ in the reward.
        count_budget_fraction: share of each step's privacy spent on the noisy clip counts.
        num_examples, batch_size, learning_rate, dim, seed: the standalone task.
        private_data_seed: draw the private examples from this seed instead (same public split and noise):
            swapping it is how tests check that observations see private data only through noisy channels.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(
        self,
        mode: Literal["standalone", "live"] = "standalone",
        num_groups: int = 3,
        rl_interval: int = 2,
        episode_steps: int = 25,
        target_epsilon: float = 4.0,
        delta: float = 1e-5,
        sigma_bounds: tuple[float, float] = (0.7, 1.5),
        clip_bounds: tuple[float, float] = (0.25, 4.0),
        reward_privacy_weight: float = 0.1,
        count_budget_fraction: float = 0.05,
        num_examples: int = 512,
        batch_size: int = 32,
        learning_rate: float = 0.5,
        dim: int = 8,
        seed: int = 0,
        private_data_seed: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("standalone", "live"):
            raise ValueError(f"mode must be 'standalone' or 'live', got {mode!r}")
        self.mode = mode
        self.num_groups = num_groups
        self.observation_space, self.action_space = make_spaces(num_groups)
        self.rl_interval = rl_interval
        self.episode_steps = episode_steps
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.sigma_bounds = sigma_bounds
        self.clip_bounds = clip_bounds
        self.reward_privacy_weight = reward_privacy_weight
        self.count_budget_fraction = count_budget_fraction
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.dim = dim
        self._seed = seed
        self.private_data_seed = private_data_seed
        self._episode = 0

    # --------------------------------------------------------------------------------------- episode
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if self.mode == "live":
            return np.zeros(self.observation_space.shape, dtype=np.float32), {}
        if seed is not None:
            self._seed, self._episode = seed, 0
        run_seed = self._seed * 1000 + self._episode
        self._episode += 1
        self.task = _Task(self.num_groups, self.num_examples, self.dim, run_seed, self.private_data_seed)
        self.engine = PerExampleGradients(self.task.model, loss_reduction="mean")
        layer_names = [n.rsplit(".", 1)[0] for n in self.engine.param_names]
        self.groups = {
            m: [n for n in self.engine.param_names if n.rsplit(".", 1)[0] == m]
            for m in dict.fromkeys(layer_names)
        }
        self.params = dict(self.task.model.named_parameters())
        self.q = self.batch_size / self.num_examples
        self.total_steps = self.episode_steps * self.rl_interval
        self.accountant = make_accountant("rdp")
        self.noise = NoiseSource(seed=run_seed)
        self.sampler = PoissonBatchSampler(self.num_examples, self.q, seed=run_seed)
        self.base_sigma = noise_for_target(
            self.target_epsilon, self.delta, self.q, self.total_steps, accountant="rdp"
        )
        base_clips = dict.fromkeys(self.groups, 1.0 / math.sqrt(len(self.groups)))
        self.mapper = ActionMapper(
            self.base_sigma, base_clips, [[g] for g in self.groups], self.sigma_bounds, self.clip_bounds
        )
        self.guard = BudgetGuard(
            self.accountant, self.target_epsilon, self.delta, self.q, self.total_steps, self.mapper.sigma_max
        )
        self.counts = ClipCountRelease(self.mapper.groups, self.batch_size, NoiseSource(seed=run_seed + 1))
        self.sigma, self.clips = self.base_sigma, dict(base_clips)
        self.initial_loss = self.prev_loss = self.task.public_loss()
        self.t = 0
        self.last_norms = dict.fromkeys(self.groups, 0.0)
        return self._observation(self.initial_loss, self.initial_loss, np.zeros(self.num_groups)), {}

    def _observation(self, loss: float, prev: float, fractions: np.ndarray) -> np.ndarray:
        return build_observation(
            loss,
            prev,
            self.initial_loss,
            self.accountant.epsilon(self.delta) / self.target_epsilon,
            self.accountant.steps / self.total_steps,
            self.sigma / self.base_sigma,
            [self.clips[g] / self.mapper.base_clips[g] for g in self.groups],
            fractions,
            [self.last_norms[g] / self.clips[g] for g in self.groups],
        )

    def _next_batch(self) -> np.ndarray:
        """The Poisson batch of the next step. Past one epoch the sampler moves on to the next epoch's fresh
        masks, as the strategy's loader does: replaying an epoch's batches would void the subsampling
        amplification the accountant charges for."""
        epoch, index = divmod(self.accountant.steps, self.sampler.num_batches)
        self.sampler.set_epoch(epoch)
        return self.sampler.logical_batch(index)

    def _private_step(self, sigma_grad: float, sigma_count: float) -> None:
        batch = self._next_batch()
        sums = {n: torch.zeros(p.shape, dtype=torch.int64) for n, p in self.params.items()}
        norms: dict[str, torch.Tensor] = {}
        grids = group_grids(self.groups, {n: p.numel() for n, p in self.params.items()}, self.clips)
        if len(batch):
            idx = torch.as_tensor(batch)
            self.task.model.zero_grad()
            self.engine.expected_batch_size = len(batch)
            self.task.loss(self.task.x[idx], self.task.y[idx]).backward()
            summed, norms = clip_to_grid_and_sum(self.engine.pop(), self.groups, self.clips, grids)
            sums.update(summed)
        c_total = math.sqrt(sum(c * c for c in self.clips.values()))
        with torch.no_grad():
            for g, names in self.groups.items():
                sq = 0.0
                std_units = sigma_grad * c_total / grids[g]  # same integer-grid release as DPSGDStrategy
                for n in names:
                    units = sums[n] + self.noise.discrete_gaussian(sums[n].shape, std_units)
                    noisy = (from_grid(units, grids[g]) / self.batch_size).to(self.params[n].dtype)
                    sq += float(noisy.pow(2).sum())
                    self.params[n].sub_(self.learning_rate * noisy)
                self.last_norms[g] = math.sqrt(sq) * self.batch_size
        self.counts.release(norms, self.clips, sigma_count)
        self.accountant.step((sigma_grad**-2 + sigma_count**-2) ** -0.5, self.q)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.mode == "live":
            raise RuntimeError("a live DPTrainingEnv is driven by RLDPController, not by step()")
        sigma, clips = self.mapper(action)
        safe = self.guard.safe_sigma(sigma, self.rl_interval)
        eps_before = self.accountant.epsilon(self.delta)
        info: dict[str, Any] = {"proposed_sigma": sigma}
        if safe is None:  # budget exhausted: end the episode without spending more
            obs = self._observation(self.prev_loss, self.prev_loss, np.zeros(self.num_groups))
            return obs, 0.0, True, False, {**info, "epsilon": eps_before, "stopped_on_budget": True}
        self.sigma, self.clips = safe, clips
        sigma_grad, sigma_count = split_sigma(safe, self.count_budget_fraction)
        for _ in range(min(self.rl_interval, self.total_steps - self.accountant.steps)):
            self._private_step(sigma_grad, sigma_count)
        loss = self.task.public_loss()
        eps = self.accountant.epsilon(self.delta)
        r = reward(self.prev_loss, loss, eps - eps_before, self.reward_privacy_weight)
        obs = self._observation(loss, self.prev_loss, self.counts.interval_mean())
        self.prev_loss = loss
        self.t += 1
        terminated = self.accountant.steps >= self.total_steps
        return obs, r, terminated, False, {**info, "sigma": safe, "epsilon": eps, "public_loss": loss}
