"""The LMO noise distribution (Laplace scale mixture, LMO-DP, arXiv:2405.18776): parameters, sampler, density.

A draw is ``n ~ Laplace(0, 1/U)`` where, independently per coordinate,

    U = a1 · G + a3 · E + a4 · V,   G ~ Gamma(shape k, scale θ),  E ~ Exponential(rate λ),  V ~ Uniform(a, b).

**Conventions (the only place they are written down).** ``gamma_scale`` θ is a *scale* (``E[G] = kθ``, density
``g^{k-1} e^{-g/θ} / (Γ(k) θ^k)``); ``exp_rate`` λ is a *rate* (``E[E] = 1/λ``, density ``λ e^{-λe}``); the Laplace
component has scale ``1/U`` (density ``(U/2) e^{-U|n|}``), so a *larger* U means *less* noise. ``U`` is the weighted
**sum** of the three independent components (not a mixture choosing one of them). A weight of 0 drops its
component. ``n`` is noise per unit of sensitivity: a strategy adds ``multiplier · C · n`` to a sum whose sensitivity
is ``C``.

Everything the accountant needs is closed form through the Laplace transform of U, the product of the components'
transforms (independence)::

    M(t) = E[e^{-tU}] = (1 + a1 θ t)^{-k} · λ / (λ + a3 t) · (e^{-αt} − e^{-βt}) / ((β − α) t),   α = a4 a, β = a4 b

- survival ``P(n > x) = ½ M(x)`` (x ≥ 0), by integrating the Laplace tail ``½ e^{-Ux}`` over U;
- density ``p(x) = ½ E[U e^{-U|x|}] = −½ M'(|x|)``;
- ``Var(n) = E[2 / U²] = 2 ∫_0^∞ t M(t) dt`` (``1/u² = ∫ t e^{-ut} dt``), finite unless U has too much mass near 0;
- ``|d/dx log p(x)| = E[U | x] ≤ E[U | 0] = E[U²] / E[U]`` (the posterior of U given |x| decreases stochastically in
  |x|), so ``log p`` is Lipschitz with constant :attr:`LMOMechanism.log_lipschitz` — the constant that makes the
  discretised accounting in :mod:`dplightning.privacy.lmo_accounting` provably pessimistic.

The sampler uses inverse CDFs of uniforms (``scipy.special.gammaincinv`` for the Gamma part), so the same code runs
on seeded uniforms and on CSPRNG uniforms (:class:`~dplightning.privacy.noise_addition.NoiseSource`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import integrate, special

from dplightning.errors import DPLightningError

if TYPE_CHECKING:  # torch is imported only when sampling: the accounting CLI stays light
    import torch
    from torch import Tensor

__all__ = ["LMOMechanism"]

_SMALL = 1e-5  # below this argument, series expansions replace expm1 ratios (relative error < 1e-15)


def _float(value: Any, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DPLightningError(f"LMOMechanism.{name} must be a number, got {value!r}; pass a float") from None
    if not math.isfinite(out):
        raise DPLightningError(f"LMOMechanism.{name} must be finite, got {value!r}; pass a finite float")
    return out


@dataclass(frozen=True)
class LMOMechanism:
    """Parameters of the LMO noise ``Laplace(0, 1/U)``, ``U = a1·Gamma(k, θ) + a3·Exp(λ) + a4·Uniform(a, b)``.

    Immutable and hashable (it is part of accounting events). See the module docstring for the conventions.

    Attributes:
        a1, a3, a4: weights ≥ 0 of the Gamma, Exponential and Uniform components (at least one > 0).
        gamma_shape: k > 0. gamma_scale: θ > 0 (scale, mean kθ).
        exp_rate: λ > 0 (rate, mean 1/λ).
        uniform_low, uniform_high: 0 ≤ a ≤ b, b > 0 (a = b is the point mass at a).
    """

    a1: float = 0.0
    a3: float = 0.0
    a4: float = 1.0
    gamma_shape: float = 1.0
    gamma_scale: float = 1.0
    exp_rate: float = 1.0
    uniform_low: float = 1.0
    uniform_high: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _float(getattr(self, f.name), f.name))
        for name in ("a1", "a3", "a4"):
            if getattr(self, name) < 0:
                raise DPLightningError(
                    f"LMOMechanism.{name} must be >= 0, got {getattr(self, name)}; weights are non-negative (0 drops "
                    "the component)"
                )
        if self.a1 == self.a3 == self.a4 == 0:
            raise DPLightningError("LMOMechanism needs a positive weight a1, a3 or a4; all three are 0")
        for name in ("gamma_shape", "gamma_scale", "exp_rate"):
            if getattr(self, name) <= 0:
                raise DPLightningError(f"LMOMechanism.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.uniform_low <= self.uniform_high or self.uniform_high <= 0:
            raise DPLightningError(
                f"LMOMechanism needs 0 <= uniform_low <= uniform_high and uniform_high > 0, got "
                f"[{self.uniform_low}, {self.uniform_high}]; swap or fix the bounds"
            )

    # ----------------------------------------------------------------------------------------- builders
    @classmethod
    def laplace(cls, scale: float) -> LMOMechanism:
        """The degenerate mixture ``U ≡ 1/scale``: plain ``Laplace(0, scale)`` noise."""
        b = _float(scale, "scale")
        if b <= 0:
            raise DPLightningError(f"Laplace scale must be > 0, got {scale}")
        return cls(a1=0.0, a3=0.0, a4=1.0, uniform_low=1.0 / b, uniform_high=1.0 / b)

    @classmethod
    def coerce(cls, value: LMOMechanism | Mapping[str, Any]) -> LMOMechanism:
        """An :class:`LMOMechanism` from itself or from its parameter dict (YAML configs)."""
        if isinstance(value, LMOMechanism):
            return value
        if isinstance(value, Mapping):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise DPLightningError(
                    f"unknown LMO parameters {unknown}; use {sorted(names)} (see `dplightning privacy lmo-search`)"
                )
            return cls(**dict(value))
        raise DPLightningError(
            f"lmo must be an LMOMechanism or a dict of its parameters, got {type(value).__name__}; pass e.g. "
            "{a1: 1.0, gamma_shape: 4.0, gamma_scale: 0.5, a3: 0.0, a4: 0.0}"
        )

    def to_dict(self) -> dict[str, float]:
        """Parameters as a plain dict (JSON / YAML); :meth:`coerce` reads it back."""
        return asdict(self)

    def key(self) -> tuple[float, ...]:
        """Parameters as a tuple (sort key of accounting events)."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def scaled(self, factor: float) -> LMOMechanism:
        """The mechanism whose noise is ``factor · n`` (U divided by ``factor``: the weights are)."""
        c = _float(factor, "factor")
        if c <= 0:
            raise DPLightningError(f"noise scale factor must be > 0, got {factor}")
        return LMOMechanism(**{**self.to_dict(), "a1": self.a1 / c, "a3": self.a3 / c, "a4": self.a4 / c})

    # ------------------------------------------------------------------------------------ moments of U
    @property
    def _alpha_beta(self) -> tuple[float, float]:
        return self.a4 * self.uniform_low, self.a4 * self.uniform_high

    @property
    def mean_u(self) -> float:
        """``E[U]``."""
        alpha, beta = self._alpha_beta
        g = self.a1 * self.gamma_shape * self.gamma_scale
        e = self.a3 / self.exp_rate
        return g + e + (alpha + beta) / 2

    @property
    def second_moment_u(self) -> float:
        """``E[U²]``."""
        alpha, beta = self._alpha_beta
        var = (
            self.gamma_shape * (self.a1 * self.gamma_scale) ** 2
            + (self.a3 / self.exp_rate) ** 2
            + (beta - alpha) ** 2 / 12
        )
        return var + self.mean_u**2

    @property
    def log_lipschitz(self) -> float:
        """K = ``E[U²]/E[U]``: ``|log p(x) − log p(y)| ≤ K |x − y|`` for the noise density p."""
        return self.second_moment_u / self.mean_u

    # ------------------------------------------------------------------------- Laplace transform of U
    def log_mgf(self, t: np.ndarray | float) -> np.ndarray:
        """``log M(t) = log E[e^{-tU}]`` for ``t ≥ 0`` (any shape, float64; ``t = inf`` gives ``-inf``)."""
        t = np.minimum(np.asarray(t, dtype=np.float64), 1e300)  # inf → huge: no 0·inf below
        out = np.zeros_like(t)
        if self.a1 > 0:
            out -= self.gamma_shape * np.log1p(self.a1 * self.gamma_scale * t)
        if self.a3 > 0:
            out -= np.log1p(self.a3 * t / self.exp_rate)
        if self.a4 > 0:
            alpha, beta = self._alpha_beta
            w = (beta - alpha) * t
            # log((1 − e^{−w}) / w), → −w/2 as w → 0
            safe = np.where(w > _SMALL, w, 1.0)
            tiny = np.minimum(w, _SMALL)
            ratio = np.where(
                w > _SMALL, np.log(-np.expm1(-safe)) - np.log(safe), -tiny / 2 + tiny * tiny / 24
            )
            out += -alpha * t + ratio
        return out

    def dlog_mgf(self, t: np.ndarray | float) -> np.ndarray:
        """``d/dt log M(t)`` (< 0) for ``t ≥ 0``."""
        t = np.minimum(np.asarray(t, dtype=np.float64), 1e300)
        out = np.zeros_like(t)
        if self.a1 > 0:
            c = self.a1 * self.gamma_scale
            out -= self.gamma_shape * c / (1 + c * t)
        if self.a3 > 0:
            out -= self.a3 / (self.exp_rate + self.a3 * t)
        if self.a4 > 0:
            alpha, beta = self._alpha_beta
            width = beta - alpha
            w = width * t
            # d/dt log((1 − e^{−wt})/(wt)) = width/expm1(w) − 1/t, → −width/2 as w → 0
            safe = np.where(w > _SMALL, w, 1.0)
            tiny = np.minimum(w, _SMALL)
            with np.errstate(over="ignore"):  # expm1(w) = inf for huge w gives the right limit, width/inf = 0
                ratio = np.where(
                    w > _SMALL, width / np.expm1(safe) - width / safe, width * (-0.5 + tiny / 12)
                )
            out += -alpha + ratio
        return out

    # --------------------------------------------------------------------------------- noise density
    def log_pdf(self, x: np.ndarray | float) -> np.ndarray:
        """``log p(x)`` of the noise n (any shape, float64)."""
        t = np.abs(np.asarray(x, dtype=np.float64))
        return math.log(0.5) + self.log_mgf(t) + np.log(-self.dlog_mgf(t))

    def pdf(self, x: np.ndarray | float) -> np.ndarray:
        """``p(x)``."""
        return np.exp(self.log_pdf(x))

    def sf(self, x: np.ndarray | float) -> np.ndarray:
        """``P(n > x)``; accurate in both tails (no ``1 − cdf`` cancellation for x ≥ 0)."""
        x = np.asarray(x, dtype=np.float64)
        half = 0.5 * np.exp(self.log_mgf(np.abs(x)))
        return np.where(x >= 0, half, 1.0 - half)

    def cdf(self, x: np.ndarray | float) -> np.ndarray:
        """``P(n ≤ x)``."""
        return self.sf(-np.asarray(x, dtype=np.float64))  # symmetric

    def interval_mass(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """``P(lo < n ≤ hi)`` elementwise (``lo ≤ hi``), each side computed from its own tail (no cancellation)."""
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        left = self.cdf(np.minimum(hi, 0.0)) - self.cdf(
            np.minimum(lo, 0.0)
        )  # part below 0, from the left tail
        right = self.sf(np.maximum(lo, 0.0)) - self.sf(
            np.maximum(hi, 0.0)
        )  # part above 0, from the right tail
        return np.maximum(left, 0.0) + np.maximum(right, 0.0)

    def quantile_abs(self, tail: float) -> float:
        """Smallest x ≥ 0 with ``P(|n| > x) ≤ tail`` (bisection on the closed-form tail; +inf if beyond 1e300)."""
        if self.log_mgf(1e300) > math.log(tail):
            return math.inf
        lo, hi = 0.0, 1.0
        while self.log_mgf(hi) > math.log(tail):
            lo, hi = hi, hi * 2
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if self.log_mgf(mid) > math.log(tail):
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-12 * hi:
                break
        return hi

    # --------------------------------------------------------------------------------------- variance
    def _tail_power(self) -> float:
        """Polynomial decay exponent of M(t) at ∞ (inf if it decays exponentially)."""
        if self.a4 > 0 and self.uniform_low > 0:
            return math.inf
        power = 0.0
        if self.a1 > 0:
            power += self.gamma_shape
        if self.a3 > 0:
            power += 1.0
        if self.a4 > 0:
            power += 1.0  # (1 − e^{−βt})/(βt) ~ 1/t when a = 0
        return power

    def variance(self) -> float:
        """``Var(n) = E[2/U²] = 2 ∫_0^∞ t M(t) dt``; ``inf`` when U has too much mass near 0 (t M(t) not integrable)."""
        if self._tail_power() <= 2.0:
            return math.inf
        if self.a1 == 0 and self.a3 == 0 and self.uniform_low == self.uniform_high:
            return 2.0 / (self.a4 * self.uniform_low) ** 2  # Laplace(1/U0): exact
        scale = 1.0 / self.mean_u  # M decays on this scale: split the integral there for quad's benefit

        def integrand(t: float) -> float:
            return t * math.exp(float(self.log_mgf(t)))

        head, _ = integrate.quad(integrand, 0.0, 20 * scale, limit=200, epsrel=1e-10)
        tail, _ = integrate.quad(integrand, 20 * scale, math.inf, limit=200, epsrel=1e-10)
        return 2.0 * (head + tail)

    def std(self) -> float:
        """Standard deviation of n."""
        return math.sqrt(self.variance())

    # ---------------------------------------------------------------------------------------- sampling
    def mixing_variable(self, v: np.ndarray) -> np.ndarray:
        """The mixing variable ``U`` (``n | U ~ Laplace(0, 1/U)``) from uniforms ``v`` ``[3, n]`` in (0, 1).

        Rows: Gamma (inverse regularised incomplete gamma), Exponential, Uniform.
        """
        big_u = np.zeros(v.shape[1])
        if self.a1 > 0:
            big_u += self.a1 * self.gamma_scale * special.gammaincinv(self.gamma_shape, v[0])
        if self.a3 > 0:
            big_u += self.a3 * (-np.log1p(-v[1])) / self.exp_rate
        if self.a4 > 0:
            big_u += self.a4 * (self.uniform_low + (self.uniform_high - self.uniform_low) * v[2])
        # U = 0 has probability 0; a float underflow to 0 must not give an infinite draw.
        return np.maximum(big_u, np.finfo(np.float64).tiny)

    def from_uniforms(self, u: Tensor) -> Tensor:
        """Noise from uniforms ``u`` ``[4, n]`` in (0, 1) (float64): ``[n]`` float64 draws of n.

        Rows 0-2 give the mixing variable (:meth:`mixing_variable`), row 3 the Laplace draw (inverse CDF).
        """
        import torch

        v = u.detach().double().cpu().numpy()
        big_u = self.mixing_variable(v[:3])
        centred = v[3] - 0.5
        lap = -np.sign(centred) * np.log1p(-2.0 * np.abs(centred)) / big_u
        return torch.from_numpy(lap)

    def sample(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        """i.i.d. draws of n with ``shape`` (float64, CPU), one U per coordinate, from ``generator``'s uniforms."""
        import torch

        n = math.prod(shape)
        u = torch.rand((4, n), generator=generator, dtype=torch.float64).clamp(1e-300, 1 - 2**-53)
        return self.from_uniforms(u).view(tuple(shape))
