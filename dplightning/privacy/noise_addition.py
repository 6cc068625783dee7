"""Noise sources for private releases: seeded (reproducible, seed assumed secret) or from the OS CSPRNG."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from dplightning.privacy.mechanisms import LMOMechanism


class NoiseSource:
    """Draws the noise of private releases: discrete (for releases, see :mod:`dplightning.privacy.discretization`)
    and continuous (diagnostics and simulations only).

    A seeded ``torch.Generator`` makes runs reproducible and its state is checkpointed; the privacy guarantee then
    assumes the seed is secret. With ``secure=True`` every uniform comes from ``os.urandom`` (a CSPRNG), so the
    noise cannot be predicted from a leaked seed or configuration, and nothing is replayed on resume.
    """

    def __init__(self, seed: int = 0, secure: bool = False) -> None:
        self.secure = secure
        self.generator = torch.Generator().manual_seed(seed)

    def _secure_uniform(self, n: int) -> Tensor:
        # 53-bit uniforms in (0, 1) from the OS CSPRNG.
        bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        return torch.from_numpy((bits.astype(np.float64) + 0.5) / float(2**53))

    def uniform(self, n: int) -> Tensor:
        """``n`` uniforms in the open interval (0, 1), float64, on 53-bit grids (never 0: logs stay finite)."""
        if self.secure:
            return self._secure_uniform(n)
        bits = torch.randint(0, 2**53, (n,), generator=self.generator, dtype=torch.int64)
        return (bits.double() + 0.5) / float(2**53)

    # ------------------------------------------------------------------------------- discrete (releases)
    def discrete_laplace(self, shape: torch.Size | tuple[int, ...], scale: float | Tensor) -> Tensor:
        """Integers with ``P(k) ∝ exp(-|k| / scale)``, int64 on CPU; ``scale`` in grid units (a float or a
        tensor of ``shape``, one scale per coordinate).

        The difference of two i.i.d. geometric variables ``⌊-scale · log U⌋`` (``P(G ≥ k) = e^{-k/scale}``).
        """
        n = math.prod(shape)
        t = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
        if bool((t <= 0).any()) or not bool(torch.isfinite(t).all()):
            raise ValueError("discrete Laplace scale must be finite and > 0")
        g1 = torch.floor(-t * torch.log(self.uniform(n)))
        g2 = torch.floor(-t * torch.log(self.uniform(n)))
        return (g1 - g2).to(torch.int64).view(tuple(shape))

    def discrete_gaussian(self, shape: torch.Size | tuple[int, ...], sigma: float) -> Tensor:
        """Integers with ``P(k) ∝ exp(-k² / (2 σ²))`` (the discrete Gaussian ``N_Z(0, σ²)``), int64 on CPU; σ in grid
        units. ``σ = 0`` gives zeros.

        Canonne–Kamath–Steinke (2020), Algorithm 3, vectorised: propose ``Y`` from the discrete Laplace of scale
        ``t = ⌊σ⌋ + 1`` and accept with probability ``exp(-(|Y| − σ²/t)² / (2σ²))`` (at least ~0.5 per round).
        """
        n = math.prod(shape)
        if sigma == 0:
            return torch.zeros(tuple(shape), dtype=torch.int64)
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"discrete Gaussian sigma must be finite and >= 0, got {sigma}")
        t = math.floor(sigma) + 1
        out = torch.empty(n, dtype=torch.int64)
        pending = torch.arange(n)
        while pending.numel():
            m = pending.numel()
            y = self.discrete_laplace((m,), float(t))
            accept_prob = torch.exp(-((y.abs().double() - sigma**2 / t) ** 2) / (2.0 * sigma**2))
            accepted = self.uniform(m) < accept_prob
            out[pending[accepted]] = y[accepted]
            pending = pending[~accepted]
        return out.view(tuple(shape))

    def discrete_lmo(
        self, shape: torch.Size | tuple[int, ...], mechanism: LMOMechanism, scale: float
    ) -> Tensor:
        """LMO noise on the integer grid: per coordinate, the mechanism's mixing variable ``U`` is drawn as for the
        continuous law and the coordinate is a discrete Laplace of scale ``scale / U`` (grid units), int64."""
        n = math.prod(shape)
        u = torch.stack([self.uniform(n) for _ in range(3)])
        mixing = torch.from_numpy(mechanism.mixing_variable(u.numpy()))
        return self.discrete_laplace(tuple(shape), (scale / mixing).view(tuple(shape)))

    # ------------------------------------------------------------------------------ continuous (not releases)
    def gaussian(self, shape: torch.Size | tuple[int, ...], std: float, device: torch.device | str = "cpu") -> Tensor:
        """``N(0, std^2)`` i.i.d., float32, on ``device``. Float noise has gaps that leak the low bits of what it is
        added to: use :meth:`discrete_gaussian` for anything released."""
        n = math.prod(shape)
        if self.secure:
            u1, u2 = self._secure_uniform(n), self._secure_uniform(n)
            z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
            return (z * std).float().view(shape).to(device)
        return (torch.randn(n, generator=self.generator) * std).view(shape).to(device)

    def lmo(
        self, shape: torch.Size | tuple[int, ...], mechanism: LMOMechanism, scale: float, device: torch.device | str = "cpu"
    ) -> Tensor:
        """``scale · n`` with n ~ ``mechanism`` i.i.d. (one U per coordinate), float64, on ``device``. Continuous: use
        :meth:`discrete_lmo` for anything released.

        Four uniforms per coordinate (seeded generator or CSPRNG) go through the mechanism's inverse CDFs.
        """
        n = math.prod(shape)
        u = torch.stack([self.uniform(n) for _ in range(4)])
        return (mechanism.from_uniforms(u) * scale).view(tuple(shape)).to(device)

    def state_dict(self) -> dict[str, Tensor | bool]:
        return {"generator": self.generator.get_state(), "secure": self.secure}

    def load_state_dict(self, state: dict[str, Tensor | bool]) -> None:
        # Secure stays secure: a run configured with the CSPRNG never falls back to the checkpoint's seeded stream
        # (and a checkpoint written by a secure run keeps its successor secure).
        self.secure = self.secure or bool(state["secure"])
        gen_state = state["generator"]
        assert isinstance(gen_state, Tensor)
        self.generator.set_state(gen_state)
