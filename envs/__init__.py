"""Gymnasium environments of dplightning (imported as ``dplightning.envs``)."""

import gymnasium as gym
from dplightning.envs.dp_training_env import DPTrainingEnv

if "dplightning/DPTraining-v0" not in gym.registry:
    gym.register(id="dplightning/DPTraining-v0", entry_point="dplightning.envs.dp_training_env:DPTrainingEnv")

__all__ = ["DPTrainingEnv"]
