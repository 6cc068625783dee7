"""Pre-train RLDP's prior policy on the simulator (public notes only: it costs no privacy), resumably.

Each episode is one simulated DP-SGD LoRA run (:class:`dplightning.envs.DPTrainingEnv`: the SGD recipe's model,
LoRA, optimizer and clip norm on pseudo-clinical notes of a seed that is not the private data's, batch 32 and 30
steps for a CPU) at the recipe's noise per averaged gradient σ/B (``--sigma-over-batch``), not at its ε: at batch
32 the recipe's ε would give four times the recipe's σ/B, where every step hurts. The agent (:class:`dplightning.envs.rldp_agent.RLDPAgent`, the controller's own
set-up) samples actions, stores every transition and takes ``--gradient-steps`` SAC updates per decision.

After every episode the agent, its replay buffer, its random streams and the episode count are written atomically
to ``--state`` (default: next to ``--out``), and the policy to ``--out``. Run the same command again after an
interruption and it continues with the next episode: the episode's seeds (LoRA init, Poisson batches, noise)
follow from the episode number, so nothing is replayed. Load the result with
``RLDPController(policy_path=..., act="deterministic")`` (see docs/rldp.md).

Usage::

    .venv/bin/python benchmarks/rldp_pretrain.py --episodes 100 --out runs/rldp_prior/policy.zip
    .venv/bin/python benchmarks/rldp_pretrain.py --quick --out /tmp/rldp_prior.zip   # tiny-llama, 2 episodes
    .venv/bin/python benchmarks/rldp_pretrain.py --recipe-episode    # the recipe's own return in the simulator
"""

from __future__ import annotations

import argparse
import functools
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The recipe's noise per averaged gradient: σ/B = 0.472/128 ≈ 0.0037 at ε = 8 and 0.760/128 ≈ 0.0059 at ε = 2;
# the simulator keeps their geometric mean at its smaller batch (the same ε at batch 32 would give four times it)
SIGMA_OVER_BATCH = 0.0047
QUICK_ENV = {
    "model_name": "tiny-llama",
    "num_records": 120,
    "max_length": 16,
    "batch_size": 16,
    "eval_examples": 8,
    "episode_steps": 4,
    "rl_interval": 2,
}


def _write(data: bytes, fh: Any) -> None:
    fh.write(data)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--episodes", type=int, default=100, help="total episodes (a resumed run counts those done)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/rldp_prior/policy.zip"), help="policy zip")
    parser.add_argument("--state", type=Path, default=None, help="resume state (default: <out>.state.pt)")
    parser.add_argument("--model", default="smollm2-135m")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--sigma-over-batch",
        type=float,
        default=SIGMA_OVER_BATCH,
        help="noise per averaged gradient σ/B of the simulated runs (default: between the recipe's at ε = 8 and 2)",
    )
    budget.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help="calibrate σ from this ε instead of --sigma-over-batch",
    )
    parser.add_argument("--episode-steps", type=int, default=30)
    parser.add_argument("--rl-interval", type=int, default=5)
    parser.add_argument(
        "--batch-size", type=int, default=32, help="expected Poisson batch of the simulated runs"
    )
    parser.add_argument("--gradient-steps", type=int, default=64, help="SAC updates per decision")
    parser.add_argument("--sac-batch-size", type=int, default=64)
    parser.add_argument(
        "--simulation-seed", type=int, default=1, help="data seed of the simulated public notes"
    )
    parser.add_argument(
        "--private-data-seed", type=int, default=0, help="the private run's data seed (refused)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the agent and of the episodes")
    parser.add_argument("--quick", action="store_true", help="tiny-llama, 2 short episodes: a smoke test")
    parser.add_argument(
        "--recipe-episode",
        action="store_true",
        help="only run one episode with the recipe's own action (all zeros) and print its return: does the "
        "simulated regime learn at all? (no agent, nothing written)",
    )
    args = parser.parse_args(argv)
    if args.quick and "--episodes" not in (argv if argv is not None else sys.argv[1:]):
        args.episodes = 2
    if args.state is None:
        args.state = args.out.with_name(args.out.name + ".state.pt")
    return args


def env_settings(args: argparse.Namespace) -> dict[str, Any]:
    batch = QUICK_ENV["batch_size"] if args.quick else args.batch_size
    budget = (
        {"target_epsilon": args.target_epsilon}
        if args.target_epsilon is not None
        else {"noise_multiplier": args.sigma_over_batch * batch}
    )
    settings: dict[str, Any] = {
        "model_name": args.model,
        **budget,
        "episode_steps": args.episode_steps,
        "rl_interval": args.rl_interval,
        "batch_size": args.batch_size,
        "simulation_seed": args.simulation_seed,
        "private_data_seed": args.private_data_seed,
        "seed": args.seed,
    }
    if args.quick:
        settings.update(QUICK_ENV)
    return settings


def _load_state(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    if state["settings"] != settings:
        from dplightning.errors import DPLightningError

        raise DPLightningError(
            f"{path} was written with other settings ({state['settings']}); pass the same arguments to resume, "
            "or another --state to start afresh"
        )
    return state


def recipe_episode(settings: dict[str, Any]) -> float:
    """The return of episode 0 under the recipe's own action (all zeros): the public-loss improvement × 100 that the
    tuned recipe gets in the simulated regime, the level a prior has to beat."""
    from dplightning.envs import DPTrainingEnv

    env = DPTrainingEnv(**settings)
    env.episode = 0
    env.reset()
    total, finished = 0.0, False
    while not finished:
        _, reward, finished, _, _ = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
        total += float(reward)
    return total


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Train until ``--episodes`` episodes are done; returns ``{"episodes", "returns", "policy", "resumed_from"}``."""
    from dplightning.checkpoint_io import atomic_write
    from dplightning.envs import DPTrainingEnv
    from dplightning.envs.rldp_agent import RLDPAgent

    args = parse_args(argv)
    settings = env_settings(args)
    if args.recipe_episode:
        total = recipe_episode(settings)
        print(f"recipe's action (all zeros), episode 0: return {total:+.3f}")
        return {"episodes": 1, "returns": [total], "policy": None, "resumed_from": 0}
    env = DPTrainingEnv(**settings)
    sizes = (int(env.observation_space.shape[0]), int(env.action_space.shape[0]))  # type: ignore[index]
    state = _load_state(args.state, settings)
    if state is None:
        agent = RLDPAgent.create(*sizes, seed=args.seed, batch_size=args.sac_batch_size)
        done, returns = 0, []
    else:
        agent = RLDPAgent.from_state_dict(state["agent"], *sizes, seed=args.seed)
        done, returns = int(state["episodes"]), list(state["returns"])
    resumed_from = done
    while done < args.episodes:
        env.episode = done  # episode e always runs on the seeds of episode e: a resume replays nothing
        obs, _ = env.reset()
        total, finished = 0.0, False
        while not finished:
            action = agent.act(obs, deterministic=False)
            next_obs, reward, finished, _, _ = env.step(action)
            agent.add(obs, next_obs, action, reward, finished)
            agent.train(args.gradient_steps)
            total += reward
            obs = next_obs
        done += 1
        returns.append(total)
        payload = {"settings": settings, "episodes": done, "returns": returns, "agent": agent.state_dict()}
        data = io.BytesIO()
        torch.save(payload, data)
        atomic_write(args.state, functools.partial(_write, data.getvalue()))
        agent.save(args.out)
        print(
            f"episode {done}/{args.episodes}: return {total:+.3f} (mean of last 10: {np.mean(returns[-10:]):+.3f})"
        )
    print(f"{done} episodes done ({done - resumed_from} in this run); policy: {args.out}")
    return {"episodes": done, "returns": returns, "policy": args.out, "resumed_from": resumed_from}


if __name__ == "__main__":
    run()
