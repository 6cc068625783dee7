"""Exact discrete Laplace and discrete Gaussian draws in integer arithmetic (Canonne, Kamath & Steinke 2020).

The vectorised samplers of :class:`~dplightning.privacy.noise_addition.NoiseSource` turn 53-bit uniforms into
geometric variables through a float logarithm: fast enough for the hundreds of thousands of coordinates of a
DP-SGD release, but their laws follow the 2^-52 lattice of the uniforms, so far in the tails they drift from the
ideal law and their support ends (about 37 scales out). A Gaussian never goes there; a Laplace does, and a
pure ε-DP claim allows no output that one neighbour can produce and the other cannot.

Here every step is a comparison of exact rationals with uniform integers: the laws are exactly the discrete
Laplace ``P(k) ∝ exp(-|k| / scale)`` and the discrete Gaussian ``P(k) ∝ exp(-k² / (2σ²))`` for the rational value
of the float ``scale`` / ``σ``, with unbounded support. A draw costs a few dozen uniform integers (Python, about
0.1–1 ms): meant for releases of a few scalars (DP-ZO), not for gradient vectors.

``randbelow(n)`` must return a uniform integer in ``[0, n)``; the samplers make no other use of randomness.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

RandBelow = Callable[[int], int]


def bernoulli(p: Fraction, randbelow: RandBelow) -> bool:
    """``True`` with probability ``p`` ∈ [0, 1], exactly."""
    return randbelow(p.denominator) < p.numerator


def bernoulli_exp(gamma: Fraction, randbelow: RandBelow) -> bool:
    """``True`` with probability ``exp(-gamma)`` for rational ``gamma ≥ 0`` (CKS Algorithm 1)."""
    while gamma > 1:  # exp(-γ) = exp(-1)^⌊γ⌋ · exp(-(γ - ⌊γ⌋))
        if not bernoulli_exp(Fraction(1), randbelow):
            return False
        gamma -= 1
    k = 1
    while bernoulli(gamma / k, randbelow):
        k += 1
    return k % 2 == 1


def discrete_laplace(scale: Fraction, randbelow: RandBelow) -> int:
    """``k`` with ``P(k) ∝ exp(-|k| / scale)`` for rational ``scale > 0`` (CKS Algorithm 2)."""
    if scale <= 0:
        raise ValueError(f"discrete Laplace scale must be > 0, got {scale}")
    # scale = t / s with integers t, s: X ~ Geometric(1 - e^{-1/t}) as U + t·V, then Y = ⌊X / s⌋.
    t, s = scale.numerator, scale.denominator
    while True:
        u = randbelow(t)
        if not bernoulli_exp(Fraction(u, t), randbelow):
            continue
        v = 0
        while bernoulli_exp(Fraction(1), randbelow):
            v += 1
        y = (u + t * v) // s
        negative = randbelow(2) == 1
        if negative and y == 0:
            continue
        return -y if negative else y


def discrete_gaussian(sigma: Fraction, randbelow: RandBelow) -> int:
    """``k`` with ``P(k) ∝ exp(-k² / (2σ²))`` for rational ``σ > 0`` (CKS Algorithm 3)."""
    if sigma <= 0:
        raise ValueError(f"discrete Gaussian sigma must be > 0, got {sigma}")
    t = math.floor(sigma) + 1
    variance = sigma * sigma
    while True:
        y = discrete_laplace(Fraction(t), randbelow)
        excess = abs(y) - variance / t
        if bernoulli_exp(excess * excess / (2 * variance), randbelow):
            return y
