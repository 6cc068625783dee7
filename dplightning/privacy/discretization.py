"""Grids that make private releases exact integers, immune to floating-point attacks.

A float sum plus float noise leaks: the noise's floats have gaps, so the low bits of the release still carry
the un-noised sum, and one released number can tell "with this example" from "without" far more often than ε
allows (Mironov 2012; Jin et al. 2022). dplightning therefore releases integers on a grid ``γ``:

1. every example's clipped contribution is rounded to integer multiples of ``γ`` (the grid is chosen so that
   the rounded vector still has norm ≤ C: its sensitivity in grid units is ``C / γ``);
2. the integers are summed exactly (int64);
3. discrete noise on the same grid is added: the discrete Gaussian ``N_Z(0, (σ C/γ)^2)`` or the discrete
   Laplace (Canonne, Kamath, Steinke 2020), so the release ``γ · (sum + noise)`` is an integer times ``γ``.

Nothing about the data survives in low bits, and the arithmetic is exact whatever precision the model computes
in. Accounting is unchanged, for these reasons:

- The discrete Gaussian with integer shifts has exactly the Rényi divergences (so the zCDP and the
  Poisson-subsampled RDP at integer orders) of the continuous Gaussian with the same σ relative to the
  sensitivity.
- The grids are fine: a sensitivity is ``C/γ ≥ 2^20`` grid units, so the noise spans millions of grid points
  and every sum over the lattice that the privacy-loss distribution is made of equals the continuous integral
  far below the accountant's discretisation (checked against dp_accounting's discrete-Gaussian PLD in the
  tests, where a unit mix-up would show). The same holds for the discrete Laplace and the discrete LMO noise
  (a discrete Laplace given the mixing variable), whose pure-ε bound ``Δ/t`` carries over as is.
- DP-ZO's scalar releases are drawn exactly (:mod:`dplightning.privacy.exact_sampling`). The vectorised samplers
  of :class:`~dplightning.privacy.noise_addition.NoiseSource` (DP-SGD's noise) draw from 52-bit uniforms through a
  float logarithm: each outcome's probability carries a small relative error that grows in the tails, and the
  geometric is cut at ~37 scales (quantified in docs/threat_model.md; not accounted).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Contributions are clipped to C(1 − η) before rounding; the rounding adds at most η·C/2 back (see l2_grid).
# η = 2^-20 changes the clipped gradient by one part in a million, and keeps a summed batch far inside int64
# (per example ≤ √d/η units: 2^30 for a million coordinates).
CLIP_MARGIN = 2.0**-20
# Scalar releases (DP-ZO): C / γ = 2^40 grid points per threshold, so clipping to [-C, C] is exact on the grid
# and an int64 sum holds millions of examples.
SCALAR_GRID_BITS = 40


def _power_of_two_at_most(x: float) -> float:
    """Largest power of two ≤ ``x`` (a power of two keeps ``k · γ`` exact in floating point)."""
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"grid bound must be a finite positive number, got {x}")
    return 2.0 ** math.floor(math.log2(x))


def l2_grid(threshold: float, dim: int) -> float:
    """Grid ``γ`` for vectors of ``dim`` coordinates clipped to L2 norm ``C(1 − η)``.

    Rounding each coordinate to the grid moves the vector by at most ``γ √dim / 2`` in L2, so with
    ``γ ≤ η C / √dim`` the rounded vector has norm ≤ ``C(1 − η) + η C / 2 < C``: the sensitivity stays C
    (the other half absorbs the float64 error of the norm and the clip factor: under 1e-9 relative for 10^7
    coordinates).
    """
    return _power_of_two_at_most(CLIP_MARGIN * threshold / math.sqrt(max(dim, 1)))


def l1_grid(threshold: float, dim: int) -> float:
    """Grid ``γ`` for vectors clipped to L1 norm ``C(1 − η)``: rounding adds at most ``γ · dim / 2`` in L1."""
    return _power_of_two_at_most(CLIP_MARGIN * threshold / max(dim, 1))


def scalar_grid(threshold: float) -> float:
    """Grid of per-example scalars clipped to ``[-C, C]``: ``C / 2^40`` (exact: ``C / γ`` is an integer)."""
    if not (threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite positive number, got {threshold}")
    return math.ldexp(threshold, -SCALAR_GRID_BITS)


def to_grid(values: Tensor, grid: float) -> Tensor:
    """``round(values / γ)`` as int64 (values in float64; round half to even)."""
    return torch.round(values.double() / grid).to(torch.int64)


def from_grid(units: Tensor, grid: float) -> Tensor:
    """``units · γ`` in float64. The integers are the release; turning them into floats is post-processing."""
    return units.double() * grid
