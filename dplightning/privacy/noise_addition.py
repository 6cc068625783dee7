"""Noise sources for private releases: seeded (reproducible) or drawn from the OS CSPRNG."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from dplightning.privacy.mechanisms import LMOMechanism


class NoiseSource:
    """Draws Gaussian and Laplace noise tensors.

    A seeded ``torch.Generator`` makes runs reproducible and its state is checkpointed; with
    ``secure=True`` uniforms come from ``os.urandom`` (a CSPRNG) and are turned into Gaussians by Box-Muller,
    so the noise cannot be predicted from a leaked seed.
    """

    def __init__(self, seed: int = 0, secure: bool = False) -> None:
        self.secure = secure
        self.generator = torch.Generator().manual_seed(seed)

    def _secure_uniform(self, n: int) -> Tensor:
        # 53-bit uniforms in (0, 1) from the OS CSPRNG.
        bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        return torch.from_numpy((bits.astype(np.float64) + 0.5) / float(2**53))

    def gaussian(self, shape: torch.Size | tuple[int, ...], std: float, device: torch.device | str = "cpu") -> Tensor:
        """``N(0, std^2)`` i.i.d., float32, on ``device``."""
        n = math.prod(shape)
        if self.secure:
            u1, u2 = self._secure_uniform(n), self._secure_uniform(n)
            z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
            return (z * std).float().view(shape).to(device)
        return (torch.randn(n, generator=self.generator) * std).view(shape).to(device)

    def laplace(self, shape: torch.Size | tuple[int, ...], scale: float, device: torch.device | str = "cpu") -> Tensor:
        """``Laplace(0, scale)`` i.i.d. (density ``exp(-|x|/scale) / (2 scale)``), float32, on ``device``."""
        n = math.prod(shape)
        u = self._secure_uniform(n) if self.secure else torch.rand(n, generator=self.generator, dtype=torch.float64)
        u = u.clamp(1e-300, 1 - 1e-16) - 0.5
        x = -scale * torch.sign(u) * torch.log1p(-2.0 * u.abs())
        return x.float().view(shape).to(device)

    def lmo(
        self, shape: torch.Size | tuple[int, ...], mechanism: LMOMechanism, scale: float, device: torch.device | str = "cpu"
    ) -> Tensor:
        """``scale · n`` with n ~ ``mechanism`` i.i.d. (one U per coordinate), float64, on ``device``.

        Four uniforms per coordinate (seeded generator or CSPRNG) go through the mechanism's inverse CDFs.
        """
        n = math.prod(shape)
        if self.secure:
            u = torch.stack([self._secure_uniform(n) for _ in range(4)])
        else:
            u = torch.rand((4, n), generator=self.generator, dtype=torch.float64)
        u = u.clamp(1e-300, 1 - 2**-53)
        return (mechanism.from_uniforms(u) * scale).view(tuple(shape)).to(device)

    def state_dict(self) -> dict[str, Tensor | bool]:
        return {"generator": self.generator.get_state(), "secure": self.secure}

    def load_state_dict(self, state: dict[str, Tensor | bool]) -> None:
        self.secure = bool(state["secure"])
        gen_state = state["generator"]
        assert isinstance(gen_state, Tensor)
        self.generator.set_state(gen_state)
