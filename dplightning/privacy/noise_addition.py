"""Noise sources for private releases: seeded (reproducible, seed assumed secret) or from the OS CSPRNG."""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from dplightning.privacy import exact_sampling
from dplightning.privacy.mechanisms import LMOMechanism

_SPLIT_SCALE = 2.0**30  # from this scale on, geometric draws are exact two-part integers (see _geometric)
_OFFSET_BITS = 20  # the exact offset spans 2^-20 of the scale, so it is kept with probability > 1 - 2^-20
_MAX_SCALE = 2.0**56  # G ≤ ~37.5·scale stays below 2^62 in int64


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

    def _integers(self, n: int, bits: int) -> Tensor:
        """``n`` uniform integers in ``[0, 2^bits)`` (``bits ≤ 62``), int64."""
        if self.secure:
            raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(64 - bits)
            return torch.from_numpy(raw.astype(np.int64))
        return torch.randint(0, 2**bits, (n,), generator=self.generator, dtype=torch.int64)

    def uniform(self, n: int) -> Tensor:
        """``n`` uniforms ``(2k + 1) / 2^53`` with ``k`` uniform in ``[0, 2^52)``, float64: exact points of the open
        interval (0, 1), all equally likely (never 0 or 1, so logs stay finite)."""
        return (self._integers(n, 52) * 2 + 1).double() / float(2**53)

    # ------------------------------------------------------------------------------- discrete (releases)
    def _geometric(self, scale: Tensor) -> Tensor:
        """One draw ``G`` with ``P(G ≥ k) = exp(-k / scale)`` per entry of ``scale`` (float64, ≤ 2^56), int64.

        Small scales: ``⌊-scale · log U⌋``. From 2^30 on, floats would put G on a coarse lattice (at 2^53 every
        draw is even, and the parity of a release would show the parity of the sum), so G is drawn in two integer
        parts, ``G = M·B + L`` with ``M = 2^m ≤ scale / 2^20``: the block ``B`` (geometric of ratio
        ``e^{-M/scale}``, fine-grained in float) and the offset ``L`` (uniform integer in ``[0, M)`` kept with
        probability ``e^{-L/scale} ≥ e^{-2^-20}``), which are independent for a geometric law.
        """
        n = scale.numel()
        out = torch.empty(n, dtype=torch.int64)
        small = scale < _SPLIT_SCALE
        if bool(small.any()):
            t = scale[small]
            out[small] = torch.floor(-t * torch.log(self.uniform(t.numel()))).to(torch.int64)
        big = torch.nonzero(~small).flatten()
        if big.numel():
            t = scale[big]
            m = torch.floor(torch.log2(t)).to(torch.int64) - _OFFSET_BITS  # per entry: M = 2^m
            block_size = torch.pow(2.0, m.double())
            blocks = torch.floor(-torch.log(self.uniform(big.numel())) * (t / block_size)).to(torch.int64)
            offsets = torch.empty(big.numel(), dtype=torch.int64)
            pending = torch.arange(big.numel())
            while pending.numel():
                bits = int(m[pending].max())
                draw = self._integers(pending.numel(), bits) >> (bits - m[pending])  # uniform in [0, 2^m)
                keep = self.uniform(pending.numel()) < torch.exp(-draw.double() / t[pending])
                offsets[pending[keep]] = draw[keep]
                pending = pending[~keep]
            out[big] = (blocks << m) + offsets
        return out

    def _geometric_scalar(self, n: int, scale: float) -> Tensor:
        """:meth:`_geometric` for ``n`` draws of one scale: the same law and the same random draws, without the
        per-entry masks and gathers (most of the cost on the few-hundred-thousand coordinates of a LoRA step)."""
        if scale < _SPLIT_SCALE:
            return torch.floor(-scale * torch.log(self.uniform(n))).to(torch.int64)
        m = math.floor(math.log2(scale)) - _OFFSET_BITS
        blocks = torch.floor(-torch.log(self.uniform(n)) * (scale / 2.0**m)).to(torch.int64)
        offsets = torch.empty(n, dtype=torch.int64)
        pending = torch.arange(n)
        while pending.numel():
            draw = self._integers(pending.numel(), m)  # uniform in [0, 2^m)
            keep = self.uniform(pending.numel()) < torch.exp(-draw.double() / scale)
            offsets[pending[keep]] = draw[keep]
            pending = pending[~keep]
        return (blocks << m) + offsets

    def _discrete_laplace_scalar(self, n: int, scale: float) -> Tensor:
        """``n`` draws of :meth:`discrete_laplace` at one scale (already checked), int64."""
        return self._geometric_scalar(n, scale) - self._geometric_scalar(n, scale)

    def discrete_laplace(self, shape: torch.Size | tuple[int, ...], scale: float | Tensor) -> Tensor:
        """Integers with ``P(k) ∝ exp(-|k| / scale)``, int64 on CPU; ``scale`` in grid units (a float or a
        tensor of ``shape``, one scale per coordinate), at most 2^56 (larger scales: :meth:`add_discrete_laplace`).

        The difference of two i.i.d. geometric variables (:meth:`_geometric`).
        """
        n = math.prod(shape)
        t = torch.as_tensor(scale, dtype=torch.float64).reshape(-1).expand(n).contiguous()
        if bool((t <= 0).any()) or not bool(torch.isfinite(t).all()):
            raise ValueError("discrete Laplace scale must be finite and > 0")
        if bool((t > _MAX_SCALE).any()):
            raise ValueError(
                f"a discrete noise scale above 2^56 grid units does not fit int64 arithmetic (got {float(t.max()):.3g}); "
                "lower the noise multiplier or use add_discrete_laplace"
            )
        return (self._geometric(t) - self._geometric(t)).view(tuple(shape))

    def add_discrete_laplace(self, units: Tensor, scale: float | Tensor) -> Tensor:
        """``units + Laplace noise`` exactly, returned as float64 (post-processing of the exact integer), for any
        scale: coordinates whose scale exceeds 2^56 grid units (LMO noise with a tiny mixing variable) are drawn
        and added in Python's unbounded integers."""
        flat = units.reshape(-1).to(torch.int64)
        t = torch.as_tensor(scale, dtype=torch.float64).reshape(-1).expand(flat.numel()).contiguous()
        if bool((t <= 0).any()) or not bool(torch.isfinite(t).all()):
            raise ValueError("discrete Laplace scale must be finite and > 0")
        out = torch.empty(flat.numel(), dtype=torch.float64)
        fits = t <= _MAX_SCALE
        if bool(fits.any()):
            noise = self._geometric(t[fits]) - self._geometric(t[fits])
            out[fits] = (flat[fits] + noise).double()
        for i in torch.nonzero(~fits).flatten().tolist():
            exact = int(flat[i]) + self._big_geometric(float(t[i])) - self._big_geometric(float(t[i]))
            out[i] = float(exact)
        return out.view(units.shape)

    def _big_geometric(self, scale: float) -> int:
        """:meth:`_geometric` for one scale above 2^56, in Python integers."""
        m = math.floor(math.log2(scale)) - _OFFSET_BITS
        block = math.floor(-math.log(float(self.uniform(1)[0])) * (scale / 2.0**m))
        while True:
            offset = 0
            for _ in range(0, m, 52):  # 52 random bits at a time
                offset = (offset << 52) | int(self._integers(1, 52)[0])
            offset >>= (-m) % 52
            if float(self.uniform(1)[0]) < math.exp(-offset / scale):
                return block * 2**m + offset

    def discrete_gaussian(self, shape: torch.Size | tuple[int, ...], sigma: float) -> Tensor:
        """Integers with ``P(k) ∝ exp(-k² / (2 σ²))`` (the discrete Gaussian ``N_Z(0, σ²)``), int64 on CPU; σ in grid
        units (at most 2^50). ``σ = 0`` gives zeros.

        Canonne–Kamath–Steinke (2020), Algorithm 3, vectorised: propose ``Y`` from the discrete Laplace of scale
        ``t = ⌊σ⌋ + 1`` and accept with probability ``exp(-(|Y| − σ²/t)² / (2σ²))`` (at least ~0.5 per round).
        """
        n = math.prod(shape)
        if sigma == 0:
            return torch.zeros(tuple(shape), dtype=torch.int64)
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"discrete Gaussian sigma must be finite and >= 0, got {sigma}")
        if sigma > _MAX_SCALE / 64:
            raise ValueError(
                f"discrete Gaussian sigma {sigma:.3g} grid units does not fit int64 arithmetic (max 2^50); "
                "lower the noise multiplier"
            )
        t = math.floor(sigma) + 1
        out = torch.empty(n, dtype=torch.int64)
        pending = torch.arange(n)
        while pending.numel():
            m = pending.numel()
            y = self._discrete_laplace_scalar(m, float(t))
            accept_prob = torch.exp(-((y.abs().double() - sigma**2 / t) ** 2) / (2.0 * sigma**2))
            accepted = self.uniform(m) < accept_prob
            out[pending[accepted]] = y[accepted]
            pending = pending[~accepted]
        return out.view(tuple(shape))

    def _lmo_scales(self, n: int, mechanism: LMOMechanism, scale: float) -> Tensor:
        """Per-coordinate Laplace scales ``scale / U`` of LMO noise, ``U`` the mechanism's mixing variable."""
        u = torch.stack([self.uniform(n) for _ in range(3)])
        return scale / torch.from_numpy(mechanism.mixing_variable(u.numpy()))

    def discrete_lmo(
        self, shape: torch.Size | tuple[int, ...], mechanism: LMOMechanism, scale: float
    ) -> Tensor:
        """LMO noise on the integer grid, int64: a discrete Laplace of scale ``scale / U`` per coordinate, U the
        mechanism's mixing variable. Refuses (ValueError) a draw whose scale leaves int64: use
        :meth:`add_discrete_lmo`, which has no such limit."""
        scales = self._lmo_scales(math.prod(shape), mechanism, scale)
        return self.discrete_laplace(tuple(shape), scales.view(tuple(shape)))

    def add_discrete_lmo(self, units: Tensor, mechanism: LMOMechanism, scale: float) -> Tensor:
        """``units + LMO noise`` on the integer grid, float64 (see :meth:`add_discrete_laplace`): per coordinate the
        mechanism's mixing variable ``U`` is drawn as for the continuous law and the noise is a discrete Laplace of
        scale ``scale / U`` (grid units)."""
        return self.add_discrete_laplace(units, self._lmo_scales(units.numel(), mechanism, scale))

    # ------------------------------------------------------------------------- exact (releases of a few scalars)
    def _randbelow(self, n: int) -> int:
        """A uniform integer in ``[0, n)`` for any ``n ≥ 1``, from this source's generator (or the CSPRNG): random
        bits 52 at a time, a draw at or above ``n`` is drawn again."""
        if n < 1:
            raise ValueError(f"randbelow needs n >= 1, got {n}")
        if n == 1:
            return 0
        bits = (n - 1).bit_length()
        while True:
            value, left = 0, bits
            while left > 0:
                chunk = min(left, 52)
                value = (value << chunk) | int(self._integers(1, chunk)[0])
                left -= chunk
            if value < n:
                return value

    def add_exact_laplace(self, units: Tensor, scale: float | Tensor) -> Tensor:
        """``units + discrete Laplace noise`` of ``scale`` grid units (one float, or one per coordinate), drawn in
        exact integer arithmetic (:mod:`dplightning.privacy.exact_sampling`): the exact law, unbounded support, at
        about a millisecond a draw. Returned as float64 (post-processing of the exact integer sum)."""
        flat = units.reshape(-1).to(torch.int64).tolist()
        scales = torch.as_tensor(scale, dtype=torch.float64).reshape(-1).expand(len(flat)).tolist()
        if not all(math.isfinite(t) and t > 0 for t in scales):
            raise ValueError("discrete Laplace scale must be finite and > 0")
        out = [
            float(u + exact_sampling.discrete_laplace(Fraction(t), self._randbelow))
            for u, t in zip(flat, scales, strict=True)
        ]
        return torch.tensor(out, dtype=torch.float64).view(units.shape)

    def add_exact_gaussian(self, units: Tensor, sigma: float) -> Tensor:
        """``units + discrete Gaussian noise`` of ``sigma`` grid units, exact (see :meth:`add_exact_laplace`)."""
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"discrete Gaussian sigma must be finite and > 0, got {sigma}")
        exact_sigma = Fraction(sigma)
        out = [
            float(u + exact_sampling.discrete_gaussian(exact_sigma, self._randbelow))
            for u in units.reshape(-1).to(torch.int64).tolist()
        ]
        return torch.tensor(out, dtype=torch.float64).view(units.shape)

    def add_exact_lmo(self, units: Tensor, mechanism: LMOMechanism, scale: float) -> Tensor:
        """``units + LMO noise``: the mixing variable ``U`` drawn as for :meth:`add_discrete_lmo`, then an exact
        discrete Laplace of scale ``scale / U`` per coordinate."""
        return self.add_exact_laplace(units, self._lmo_scales(units.numel(), mechanism, scale))

    # ------------------------------------------------------------------------------ continuous (not releases)
    def gaussian(
        self, shape: torch.Size | tuple[int, ...], std: float, device: torch.device | str = "cpu"
    ) -> Tensor:
        """``N(0, std^2)`` i.i.d., float32, on ``device``. Float noise has gaps that leak the low bits of what it is
        added to: use :meth:`discrete_gaussian` for anything released."""
        n = math.prod(shape)
        if self.secure:
            u1, u2 = self._secure_uniform(n), self._secure_uniform(n)
            z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
            return (z * std).float().view(shape).to(device)
        return (torch.randn(n, generator=self.generator) * std).view(shape).to(device)

    def lmo(
        self,
        shape: torch.Size | tuple[int, ...],
        mechanism: LMOMechanism,
        scale: float,
        device: torch.device | str = "cpu",
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
