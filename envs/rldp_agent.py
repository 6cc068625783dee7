"""`RLDPAgent`: the Soft Actor-Critic agent of RLDP (stable-baselines3), shared by the live controller and the
pre-training script.

Set-up, and why:

- the actor's mean head starts at zero, so the untrained agent's mean action is 0: exactly the tuned recipe;
- its log-std starts small (``initial_log_std``, default −2: std ≈ 0.14 in action units), so sampled actions
  explore near the recipe instead of uniformly over the action box;
- a fixed small entropy coefficient (not SB3's "auto", which stays ≈ 1 for the few updates a run allows and
  keeps the actions random);
- γ = 1 with the run's last decision terminal: the return is the run's total public-loss improvement;
- its own random streams (Python, NumPy, torch CPU), swapped in around every call and kept in its state, so the
  agent neither disturbs the training's global RNG nor depends on it, and a resumed agent continues its stream.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from dplightning.envs.rldp_core import OBS_LIMIT
from dplightning.errors import DPLightningError

__all__ = ["RLDPAgent", "make_spaces"]


def make_spaces(observation_size: int, action_size: int) -> tuple[spaces.Box, spaces.Box]:
    """(observation space, action space) of RLDP."""
    obs = spaces.Box(-OBS_LIMIT, OBS_LIMIT, shape=(observation_size,), dtype=np.float32)
    act = spaces.Box(-1.0, 1.0, shape=(action_size,), dtype=np.float32)
    return obs, act


class _Spaces(gym.Env):
    """Only the spaces: SB3 needs an env to build or load an agent; the agent is fed by hand."""

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium declares it an instance attribute)

    def __init__(self, observation_size: int, action_size: int) -> None:
        self.observation_space, self.action_space = make_spaces(observation_size, action_size)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        return np.zeros(self.observation_space.shape, dtype=np.float32), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        raise RuntimeError("RLDP's agent is fed transitions by hand; this env only carries the spaces")


def _global_rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_global_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


@contextmanager
def _isolated(state: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """Run with ``state`` as the global RNG state (``None``: keep the current one); yields a dict that holds the
    state left behind, and restores the caller's state (CUDA's too: SB3's seeding reseeds every device)."""
    saved = _global_rng_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    out: dict[str, Any] = {}
    with torch.random.fork_rng(devices=devices):
        try:
            if state is not None:
                _set_global_rng_state(state)
            yield out
            out.update(_global_rng_state())
        finally:
            _set_global_rng_state(saved)


class RLDPAgent:
    """A SAC agent fed transitions by hand (the training loop, not SB3, is the driver).

    Build one with :meth:`create` or :meth:`load`; :meth:`act`, :meth:`add`, :meth:`train`; persist with
    :meth:`save` (the policy zip) or :meth:`state_dict` (agent, replay buffer and random streams).
    """

    def __init__(self, sac: Any, rng: dict[str, Any]) -> None:
        self.sac = sac
        self.rng = rng

    @classmethod
    def create(
        cls,
        observation_size: int,
        action_size: int,
        *,
        seed: int,
        learning_rate: float = 3e-4,
        buffer_size: int = 10_000,
        batch_size: int = 64,
        tau: float = 0.005,
        gamma: float = 1.0,
        ent_coef: float = 0.01,
        initial_log_std: float = -2.0,
        net_arch: tuple[int, ...] = (64, 64),
    ) -> RLDPAgent:
        from stable_baselines3 import SAC
        from stable_baselines3.common.logger import configure

        with _isolated(None) as rng:
            sac = SAC(
                "MlpPolicy",
                _Spaces(observation_size, action_size),
                learning_rate=learning_rate,
                buffer_size=buffer_size,
                learning_starts=0,
                batch_size=batch_size,
                tau=tau,
                gamma=gamma,
                ent_coef=ent_coef,
                seed=seed,
                device="cpu",
                policy_kwargs={"net_arch": list(net_arch)},
            )
            # SB3 types these heads loosely; they are the Linear layers of the Gaussian actor
            mu = cast(torch.nn.Linear, sac.actor.mu)
            log_std = cast(torch.nn.Linear, sac.actor.log_std)
            with torch.no_grad():
                mu.weight.zero_()
                mu.bias.zero_()
                log_std.weight.zero_()
                log_std.bias.fill_(initial_log_std)
        sac.set_logger(configure(None, []))
        return cls(sac, rng)

    @classmethod
    def load(
        cls, source: str | os.PathLike[str] | bytes, observation_size: int, action_size: int, *, seed: int
    ) -> RLDPAgent:
        """A saved policy zip (path or bytes); refused when its spaces differ from this problem's."""
        from stable_baselines3 import SAC
        from stable_baselines3.common.logger import configure

        data = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
        with _isolated(None) as rng:
            torch.manual_seed(seed)
            try:
                sac = SAC.load(data, env=_Spaces(observation_size, action_size), device="cpu")
            except ValueError as exc:  # SB3's message for mismatched spaces
                raise DPLightningError(
                    f"the policy expects other observation/action sizes than this run's ({observation_size}, "
                    f"{action_size}); pre-train it with the same clip_allocation and count_budget_fraction"
                ) from exc
            sac.set_random_seed(seed)
        sac.set_logger(configure(None, []))
        return cls(sac, rng)

    # ------------------------------------------------------------------------------------------ acting
    def act(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        """The policy's mean action (``deterministic``) or a sample from it."""
        with _isolated(self.rng) as rng:
            action, _ = self.sac.predict(obs, deterministic=deterministic)
        self.rng = rng
        return np.asarray(action, dtype=np.float32)

    def add(
        self, obs: np.ndarray, next_obs: np.ndarray, action: np.ndarray, reward: float, done: bool
    ) -> None:
        self.sac.replay_buffer.add(
            obs[None], next_obs[None], np.asarray(action)[None], np.array([reward]), np.array([done]), [{}]
        )

    def train(self, gradient_steps: int, batch_size: int | None = None) -> dict[str, float]:
        """``gradient_steps`` SAC updates from the replay buffer; returns SB3's last losses."""
        with _isolated(self.rng) as rng:
            self.sac.train(gradient_steps=gradient_steps, batch_size=batch_size or self.sac.batch_size)
        self.rng = rng
        values = self.sac.logger.name_to_value
        return {
            k.split("/")[1]: float(values[k])
            for k in ("train/actor_loss", "train/critic_loss")
            if k in values
        }

    @property
    def buffer_size(self) -> int:
        return int(self.sac.replay_buffer.size())

    # ---------------------------------------------------------------------------------- persistence
    def policy_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.sac.save(buf)
        return buf.getvalue()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """The SB3 zip (policy, critics, optimizers), written atomically."""
        from dplightning.checkpoint_io import atomic_write

        data = self.policy_bytes()
        return atomic_write(path, lambda fh: fh.write(data))

    def state_dict(self) -> dict[str, Any]:
        replay = io.BytesIO()
        self.sac.save_replay_buffer(replay)
        return {"agent": self.policy_bytes(), "replay_buffer": replay.getvalue(), "rng": self.rng}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], observation_size: int, action_size: int, *, seed: int
    ) -> RLDPAgent:
        agent = cls.load(state["agent"], observation_size, action_size, seed=seed)
        agent.sac.load_replay_buffer(io.BytesIO(state["replay_buffer"]))
        agent.rng = state["rng"]
        return agent
