"""Per-example clipping by parameter groups: flat, per-layer, per-adapter (LoRA A and B jointly), flat L1.

A group ``g`` with threshold ``C_g`` bounds each example's contribution to that group's summed gradient;
the sum over groups is then a (heteroscedastic) Gaussian mechanism, see :mod:`dplightning.privacy.noise_addition`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from dplightning.privacy.discretization import CLIP_MARGIN, l1_grid, l2_grid, to_grid

ClippingMode = Literal["flat", "per_layer", "per_adapter", "flat_l1"]
CLIPPING_MODES: tuple[str, ...] = ("flat", "per_layer", "per_adapter", "flat_l1")

_LORA_SUFFIX = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B)(?:\.[^.]+)?\.weight$")


def group_key(param_name: str, mode: ClippingMode) -> str:
    """Name of the clipping group of ``param_name`` under ``mode``."""
    if mode in ("flat", "flat_l1"):
        return "all"
    if mode == "per_layer":
        return param_name
    stripped = _LORA_SUFFIX.sub("", param_name)
    if stripped != param_name:
        return stripped  # both lora_A and lora_B of one adapter map to the adapted module
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def make_groups(param_names: Sequence[str], mode: ClippingMode) -> dict[str, list[str]]:
    """``{group: [param names]}`` in first-seen order."""
    groups: dict[str, list[str]] = {}
    for name in param_names:
        groups.setdefault(group_key(name, mode), []).append(name)
    return groups


def per_example_norms(
    grads: Mapping[str, Tensor], groups: Mapping[str, Sequence[str]], p: float = 2.0
) -> dict[str, Tensor]:
    """Per-example ``L_p`` norm of each group's gradient, ``{group: [B]}``."""
    norms: dict[str, Tensor] = {}
    for group, names in groups.items():
        if p == 1.0:
            parts = [grads[n].flatten(1).abs().sum(1) for n in names]
            norms[group] = torch.stack(parts).sum(0)
        else:
            parts = [grads[n].flatten(1).pow(2).sum(1) for n in names]
            norms[group] = torch.stack(parts).sum(0).sqrt()
    return norms


def clip_factors(norms: Tensor, threshold: float, stability: float | None = None) -> Tensor:
    """Per-example scale factors ``[B]``: ``min(1, C / ||g_i||)`` (clipping), or with ``stability`` γ > 0 the
    automatic-clipping normalisation ``C / (||g_i|| + γ)`` (Bu et al. 2022). Either way ``factor·||g_i|| ≤ C``,
    so the sensitivity (and the noise calibration) is the same."""
    if stability is not None:
        return threshold / (norms + stability)
    return (threshold / (norms + 1e-12)).clamp(max=1.0)


def group_grids(
    groups: Mapping[str, Sequence[str]],
    sizes: Mapping[str, int],
    thresholds: Mapping[str, float],
    p: float = 2.0,
) -> dict[str, float]:
    """Grid ``γ_g`` of each group (``sizes``: elements per parameter) for its threshold and dimension."""
    grid = l1_grid if p == 1.0 else l2_grid
    return {g: grid(thresholds[g], sum(sizes[n] for n in names)) for g, names in groups.items()}


def clip_to_grid_and_sum(
    grads: Mapping[str, Tensor],
    groups: Mapping[str, Sequence[str]],
    thresholds: Mapping[str, float],
    grids: Mapping[str, float],
    p: float = 2.0,
    stability: float | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Exact clipped sums for a private release, in grid units.

    Each example's group gradient is taken to float64 (whatever precision it was computed in), clipped (or, with
    ``stability``, normalised) to ``C_g(1 − η)``, rounded to integer multiples of ``γ_g`` (norm still ≤ ``C_g``,
    see :func:`~dplightning.privacy.discretization.l2_grid`) and summed as int64, so the sum is exact and one
    example moves it by at most ``C_g / γ_g`` grid units. An example whose group norm is not finite (an inf or
    NaN anywhere in its gradient) contributes zero to that group, silently: masking with ``torch.where`` (0·NaN
    would be NaN) keeps one bad record from poisoning the release, and nothing is raised or logged about it.

    Returns:
        ``({param: int64 summed units [*shape]}, {group: per-example pre-clip norms [B] float64})``.
    """
    wide = {n: g.detach().double() for n, g in grads.items()}
    norms = per_example_norms(wide, groups, p)
    summed: dict[str, Tensor] = {}
    for group, names in groups.items():
        norm = norms[group]
        finite = torch.isfinite(norm)
        factors = clip_factors(norm.nan_to_num(0.0), thresholds[group] * (1.0 - CLIP_MARGIN), stability)
        factors = torch.where(finite, factors, torch.zeros_like(factors))
        units = {}
        for n in names:
            g = wide[n]
            keep = finite.view(-1, *([1] * (g.dim() - 1)))
            contribution = torch.where(keep, g, torch.zeros_like(g)) * factors.view_as(keep)
            units[n] = to_grid(contribution.nan_to_num(0.0, 0.0, 0.0), grids[group])
        within = _within_sensitivity(units, thresholds[group] / grids[group], p)
        for n, u in units.items():
            summed[n] = torch.where(within.view(-1, *([1] * (u.dim() - 1))), u, torch.zeros_like(u)).sum(0)
    return summed, norms


def _within_sensitivity(units: Mapping[str, Tensor], bound: float, p: float) -> Tensor:
    """Per example: does the rounded contribution keep its norm below ``bound`` grid units? By construction it
    stays below ``bound·(1 − η/2)``; this re-check on the integers themselves (at ``bound·(1 − η/4)``) is a safety
    net for float corner cases (norms that underflow, factors that overflow), whose examples then contribute 0."""
    parts = [u.flatten(1).double() for u in units.values()]
    if p == 1.0:
        norm = torch.stack([x.abs().sum(1) for x in parts]).sum(0)
    else:
        norm = torch.stack([x.pow(2).sum(1) for x in parts]).sum(0).sqrt()
    return norm <= bound * (1.0 - CLIP_MARGIN / 4)
