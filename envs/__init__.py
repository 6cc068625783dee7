"""Gymnasium environments of dplightning (imported as ``dplightning.envs``).

Importing the package registers ``dplightning/DPTraining-v0`` with Gymnasium, so ``gym.make`` works after
``import dplightning.envs``; the registration names the class by string and Gymnasium imports it only on
``make``. ``DPTrainingEnv`` itself (torch, the privacy core) is imported on first access (PEP 562), so the
callbacks that only need :mod:`dplightning.envs.rldp_core` do not load the environment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gymnasium as gym

from dplightning._lazy import lazy_exports

ENV_ID = "dplightning/DPTraining-v0"

if ENV_ID not in gym.registry:  # re-imports (reloads, several test modules) must not re-register
    gym.register(id=ENV_ID, entry_point="dplightning.envs.dp_training_env:DPTrainingEnv")

# Public name -> submodule of this package that defines it.
_EXPORTS: dict[str, str] = {"DPTrainingEnv": "dp_training_env"}

# Spelled out (not derived from _EXPORTS) so that linters and IDEs see the re-exports; a test keeps the two
# in step.
__all__ = ["ENV_ID", "DPTrainingEnv"]

if TYPE_CHECKING:
    from dplightning.envs.dp_training_env import DPTrainingEnv


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
