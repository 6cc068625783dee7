"""Privatised clip counts: how many examples of a step were clipped, released with Gaussian noise.

Controllers that move clip thresholds (quantile clipping, RLDP) need the fraction of clipped examples, which
depends on the private batch. It is released as a noisy count on an integer grid (discrete Gaussian noise, see
:mod:`dplightning.privacy.discretization`), and its privacy is paid out of the step's own: :func:`split_sigma`
splits one σ between the gradient and the count release so that together they cost exactly σ.

- :func:`split_sigma` — the gradient / clip-count noise split whose combination costs exactly σ.
- :class:`ClipCountRelease` — privatised clip fractions per action group, drawing from :func:`count_noise_source`
  (seeded and checkpointed, or the OS CSPRNG).
- :data:`COUNT_GRID` — the grid of the released counts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dplightning.errors import DPLightningError
from dplightning.privacy.discretization import from_grid, to_grid
from dplightning.privacy.noise_addition import NoiseSource

__all__ = ["COUNT_GRID", "ClipCountRelease", "count_noise_source", "count_noise_state", "split_sigma"]

COUNT_GRID = 2.0**-20  # grid of released clip counts: an example's value in [0, 1] spans 2^20 grid steps


def split_sigma(sigma: float, count_budget_fraction: float) -> tuple[float, float]:
    """(σ_grad, σ_count) with ``σ_grad^-2 + σ_count^-2 = σ^-2``: the count release takes the fraction ``f`` of
    the step's privacy (in σ^-2 units), so the step still costs exactly σ (Andrew et al. 2021): two Gaussian releases of multipliers σ₁, σ₂ on the same
    sample compose to one of multiplier ``(σ₁^-2 + σ₂^-2)^-1/2``."""
    f = count_budget_fraction
    if not 0.0 < f < 1.0:
        raise DPLightningError(f"count_budget_fraction must be in (0, 1), got {f}")
    # Inflate by 1e-12 so float rounding in the recombination can never land below σ (the accountant rounds
    # a σ even one ulp under a grid value down to the next grid value, which the guard did not check).
    pad = 1.0 + 1e-12
    return pad * sigma / math.sqrt(1.0 - f), pad * sigma / math.sqrt(f)


def count_noise_seed(strategy_seed: int, channel: str) -> int:
    """The seed of a count channel's noise: a hash of the strategy's seed (the secret one that draws the gradient
    noise and the batches) and the channel's name, so each channel has its own stream and none follows a public
    seed (``seed_everything``, a callback's default) that would let anyone subtract the noise from the counts."""
    digest = hashlib.sha256(f"dplightning-count-seed:{strategy_seed}:{channel}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def count_noise_source(
    seed: int, secure: bool, state: Mapping[str, Any] | None = None, steps_done: int = 0
) -> NoiseSource:
    """The noise source of a clip-count release.

    ``secure`` (the strategy's ``secure_rng``) or a ``state`` saved by a secure run gives the OS CSPRNG:
    nothing is restored, and a resumed secure run never falls back to a seeded stream. Otherwise the stream
    is seeded and continues from ``state`` (see :func:`count_noise_state`): a resumed run must draw what the
    uninterrupted run would have drawn, because re-drawing the noise of steps 1…k lets anyone difference two
    releases of the same counts. A run resumed after ``steps_done`` releases without a saved stream gets a
    stream keyed to the resume point instead of the start's.
    """
    state = state or {}
    if secure or state.get("secure"):
        return NoiseSource(seed=seed, secure=True)
    if state.get("generator") is not None:
        source = NoiseSource(seed=seed)
        source.generator.set_state(state["generator"])
        return source
    if steps_done > 0:
        digest = hashlib.sha256(f"dplightning-count-noise:{seed}:{steps_done}".encode()).digest()
        return NoiseSource(seed=int.from_bytes(digest[:8], "little"))
    return NoiseSource(seed=seed)


def count_noise_state(source: NoiseSource) -> dict[str, Any]:
    """What a checkpoint keeps of a count-noise source: the seeded stream's position, or only the fact that
    the CSPRNG was used (there is nothing to restore, and nothing that could replay)."""
    if source.secure:
        return {"secure": True}
    return {"secure": False, "generator": source.generator.get_state()}


class ClipCountRelease:
    """Releases, per action group ``j``, the noisy count ``Σ_i mean_{g∈j} 1[||g_i|| > C_g]`` plus noise of std ``s``.

    Each example adds at most 1 to each of the ``k`` counts, so the count vector has L2 sensitivity ``√k`` and
    the noise std is ``s = σ_count·√k``. Fractions are averaged over the decision interval (less noise).

    ``centered=True`` (Andrew et al. 2021) releases ``Σ_i (1[clipped] − ½)`` instead: each example moves each
    count by at most ½, so the sensitivity halves to ``√k/2`` and the same ``σ_count`` needs half the noise
    std. The fraction is then ``noisy centred sum / m + ½`` with ``m`` the expected batch size.

    ``noise`` is seeded or the OS CSPRNG (:func:`count_noise_source`).
    """

    def __init__(
        self, groups: list[list[str]], expected_batch_size: float, noise: NoiseSource, centered: bool = False
    ) -> None:
        self.groups = groups
        self.expected_batch_size = expected_batch_size
        self.noise = noise
        self.centered = centered
        self._sum = np.zeros(len(groups))
        self._n = 0

    def release(
        self, norms: Mapping[str, Tensor], thresholds: Mapping[str, float], sigma_count: float
    ) -> np.ndarray:
        """One step's noisy clip fractions ``[k]`` (also accumulated for :meth:`interval_mean`).

        The counts are released on the grid ``γ = 2^-20`` (an integer sum plus discrete Gaussian noise, see
        :mod:`dplightning.privacy.discretization`), so no low bit of the exact count survives in the release.
        """
        k = len(self.groups)
        units = torch.zeros(k, dtype=torch.int64)
        for j, members in enumerate(self.groups):
            present = [g for g in members if g in norms]
            if present:
                clipped = torch.stack([(norms[g] > thresholds[g]).double() for g in present]).mean(0)
                # Each example adds a value in [0, 1] (centred: [-1/2, 1/2]), still within it on the grid.
                units[j] = to_grid(clipped - 0.5 if self.centered else clipped, COUNT_GRID).sum()
        sensitivity = math.sqrt(k) * (0.5 if self.centered else 1.0)
        noise = self.noise.discrete_gaussian((k,), sigma_count * sensitivity / COUNT_GRID)
        counts = from_grid(units + noise, COUNT_GRID).numpy()
        fractions = counts / self.expected_batch_size + (0.5 if self.centered else 0.0)
        self._sum += fractions
        self._n += 1
        return fractions

    def interval_mean(self) -> np.ndarray:
        """Mean noisy fraction since the last call ``[k]`` (post-processing of released values)."""
        out = self._sum / max(self._n, 1)
        self._sum, self._n = np.zeros(len(self.groups)), 0
        return out
