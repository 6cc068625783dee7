"""Per-example clipping by parameter groups: flat, per-layer, per-adapter (LoRA A and B jointly), flat L1.

A group ``g`` with threshold ``C_g`` bounds each example's contribution to that group's summed gradient;
the sum over groups is then a (heteroscedastic) Gaussian mechanism, see :mod:`dplightning.privacy.noise_addition`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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
    NaN anywhere in its gradient) contributes zero to that group, silently: masking keeps one bad record from
    poisoning the release, and nothing is raised or logged about it. Each example's rounded contribution is
    checked again on the integers themselves; one over ``C_g / γ_g`` would contribute zero.

    The work streams through each parameter in cache-sized blocks of examples (see :func:`_fast_group_sums`);
    a group where that path cannot vouch for every example is recomputed by the plain whole-tensor path
    (:func:`_exact_group_sums`). Both give the same integers, bit for bit.

    Returns:
        ``({param: int64 summed units [*shape]}, {group: per-example pre-clip norms [B] float64})``.
    """
    summed: dict[str, Tensor] = {}
    norms: dict[str, Tensor] = {}
    for group, names in groups.items():
        mats = {n: _as_matrix(grads[n]) for n in names}
        norm = _group_norms(mats, p)
        clip = _GroupClip.build(norm, thresholds[group], grids[group], p, stability)
        sums = _fast_group_sums(mats, clip)
        if sums is None:
            sums = _exact_group_sums(mats, clip)
        for n, units in sums.items():
            summed[n] = units.view(grads[n].shape[1:])
        norms[group] = norm
    return summed, norms


# Float64 elements per block of examples on CPU (2 MiB): the several passes over a block hit cache, not memory,
# and blocks are still large enough that per-call overhead stays small. On SmolLM2-135M's LoRA shapes, 2^16 to
# 2^20 were within 25% of each other, 2^16 the slowest.
_BLOCK_ELEMENTS = 2**18
# Largest magnitude ``|g_j · factor / γ|`` the fast path accepts up front: far from float64 overflow (2^1024).
_SCALED_CAP = 2.0**1000
# The fast path folds ``factor / γ`` into one multiplier; that rounds like ``(g · factor) / γ`` for these γ.
_FOLD_MIN_GRID, _FOLD_MAX_GRID = 2.0**-1000, 1.0
# Integer-valued float64s add exactly while every partial sum stays below 2^53; the fast path needs
# B · C/γ below this (each example's integers are at most C/γ in magnitude).
_EXACT_FLOAT_INTEGERS = 2.0**52


def _as_matrix(grad: Tensor) -> Tensor:
    """``[B, *shape] -> [B, D]`` in the gradient's own dtype (a view when the layout allows)."""
    grad = grad.detach()
    return grad.flatten(1) if grad.dim() > 1 else grad.unsqueeze(1)


def _block_sizes(mat: Tensor) -> list[int]:
    """Rows per block, covering ``mat``: cache-sized blocks on CPU, one block on an accelerator (fewer kernel
    launches).

    No block holds a single row unless the matrix does: a multi-threaded sum over a lone row splits the row
    between threads, which changes its rounding; over two rows or more, each row is summed whole by one thread,
    as in the whole matrix (and a matrix of one row is summed beside a row of zeros, see
    :func:`_row_power_sums_`)."""
    count = mat.shape[0]
    rows = count if mat.device.type != "cpu" else max(2, _BLOCK_ELEMENTS // max(mat.shape[1], 1))
    sizes = [rows] * (count // rows) + ([count % rows] if count % rows else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes


def _blocks(mat: Tensor, *companions: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """``(float64 scratch block, mat's rows, each companion's rows)`` per block of rows. The scratch blocks are
    views of one buffer, reused from block to block, so the working set stays in cache."""
    sizes = _block_sizes(mat)
    buffer = torch.empty(max(sizes, default=0), mat.shape[1], dtype=torch.float64, device=mat.device)
    parts = [x.split(sizes) for x in (mat, *companions)]
    for size, *rows in zip(sizes, *parts):
        yield (buffer[:size], *rows)


def _power_sums(mat: Tensor, p: float) -> Tensor:
    """Per row, ``Σ_j x_j²`` (``Σ_j |x_j|`` for ``p = 1``) of ``mat`` in float64, block by block.

    Each row's sum is the one ``mat.double().pow(2).sum(1)`` computes (same values, same reduction of a
    contiguous row; for a lone row, the one of a matrix of several), without a float64 copy of the whole
    matrix."""
    out = torch.empty(mat.shape[0], dtype=torch.float64, device=mat.device)
    for block, rows, out_rows in _blocks(mat, out):
        block.copy_(rows)
        _row_power_sums_(block, p, out_rows)
    return out


def _row_power_sums_(block: Tensor, p: float, out: Tensor) -> None:
    """``out[i] = Σ_j |block_ij|^p`` (``p`` 1 or 2), overwriting ``block`` with the powers on the way. ``x · x``
    is what ``pow(2)`` computes, so the sums are those of ``block.pow(2).sum(1)``.

    A lone row is summed beside a row of zeros: on several threads torch splits a lone wide row between them,
    in another order than a row of a matrix, so an example's norm (its clip factor, its integers at rounding
    ties) would depend on whether its (micro-)batch held another record, a dependence the bound does not cover.
    On CPU each row's sum is thus a function of that row alone, whatever the batch and the thread count."""
    if p == 1.0:
        block.abs_()
    else:
        block.mul_(block)
    if block.shape[0] == 1:
        out.copy_(torch.cat([block, torch.zeros_like(block)]).sum(1)[:1])
    else:
        torch.sum(block, 1, out=out)


def _group_norms(mats: Mapping[str, Tensor], p: float) -> Tensor:
    """Per-example ``L_p`` norm of the group in float64; equals :func:`per_example_norms` of float64 copies
    (except a batch of one wide example on several threads, see :func:`_row_power_sums_`)."""
    total = torch.stack([_power_sums(m, p) for m in mats.values()]).sum(0)
    return total if p == 1.0 else total.sqrt()


@dataclass(frozen=True)
class _GroupClip:
    """One group's per-example clip: pre-clip norms, factors (0 where the norm is not finite), which examples
    are finite, the grid ``γ``, the bound ``C/γ`` in grid units and the norm order."""

    norm: Tensor
    factors: Tensor
    finite: Tensor
    grid: float
    bound: float
    p: float

    @classmethod
    def build(
        cls, norm: Tensor, threshold: float, grid: float, p: float, stability: float | None
    ) -> _GroupClip:
        finite = torch.isfinite(norm)
        factors = clip_factors(norm.nan_to_num(0.0), threshold * (1.0 - CLIP_MARGIN), stability)
        factors = torch.where(finite, factors, torch.zeros_like(factors))
        return cls(norm, factors, finite, grid, threshold / grid, p)

    def within(self, power_sums: Tensor) -> Tensor:
        """Per example: is the rounded contribution, given as ``Σ|u_j|^p`` in float64, within the bound? By
        construction it stays below ``bound·(1 − η/2)``; this re-check on the integers (at ``bound·(1 − η/4)``)
        is a safety net for float corner cases (norms that underflow, factors that overflow)."""
        norm = power_sums if self.p == 1.0 else power_sums.sqrt()
        return norm <= self.bound * (1.0 - CLIP_MARGIN / 4)


def _fast_group_sums(mats: Mapping[str, Tensor], clip: _GroupClip) -> dict[str, Tensor] | None:
    """The group's int64 sums, streamed block by block without any full-size float64 or int64 copy; ``None``
    where this path cannot show that it matches :func:`_exact_group_sums` for every example.

    Per parameter and block of examples: ``g · (factor/γ)`` in float64, rounded in place, then the per-example
    ``Σ|u_j|^p`` of the rounded values (the integers' own norm check, on the very values the plain path would
    convert to int64) and their column sums. Examples with a non-finite norm are overwritten with 0, as the
    plain path masks them. The column sums are float64 sums of integers; once every example has passed the
    re-check, ``|u_j| ≤ C/γ`` and ``B · C/γ < 2^52`` keep every partial sum exact, and they become int64 at the
    end. It bails out (``None``) on:

    - a grid outside ``[2^-1000, 1]`` or ``B · C/γ ≥ 2^52`` (the fold below or the exact float sum would fail);
    - a finite example whose scaled values could reach float64 overflow (``|g_j| ≤ 2‖g‖`` bounds them: the
      float norm is at least each coordinate's magnitude, or ``2^-500`` covers coordinates whose squares
      underflow), where the plain path's zeroing of non-finite products would matter;
    - any example whose rounded contribution fails the integer re-check.

    Otherwise every example's integers equal the plain path's: the same float64 products (``γ = 2^-k ≤ 1``, so
    ``f/γ`` is exact and ``g · (f/γ)`` rounds like ``(g · f)/γ``, unless ``|g · f|`` is subnormal, where both
    round to 0), with nothing for the plain path's masks to change, and the same re-check decisions. Bail-outs
    take float corner cases only (float64 gradients whose squares underflow under automatic clipping, absurd
    thresholds): an inf or NaN example stays on this path, so its presence barely changes the step's time.
    """
    count = next(iter(mats.values())).shape[0]
    grid = clip.grid
    if count == 0 or not _FOLD_MIN_GRID <= grid <= _FOLD_MAX_GRID:
        return None
    if count * clip.bound >= _EXACT_FLOAT_INTEGERS:
        return None
    reach = clip.factors * clip.norm.nan_to_num(0.0).clamp(min=2.0**-500) * (4.0 / grid)
    scale = clip.factors / grid
    safe = (reach < _SCALED_CAP) & torch.isfinite(scale) | ~clip.finite
    all_safe, all_finite = torch.stack([safe.all(), clip.finite.all()]).tolist()  # one host sync
    if not all_safe:
        return None
    masked = None if all_finite else ~clip.finite  # examples that contribute exactly zero
    column_sums, power_sums = {}, []
    for name, mat in mats.items():
        column_sums[name], row_powers = _scaled_block_sums(mat, scale, masked, clip.p)
        power_sums.append(row_powers)
    if not bool(clip.within(torch.stack(power_sums).sum(0)).all()):
        return None
    return {n: s.to(torch.int64) for n, s in column_sums.items()}


def _scaled_block_sums(mat: Tensor, scale: Tensor, masked: Tensor | None, p: float) -> tuple[Tensor, Tensor]:
    """``(Σ_i u_i, Σ_j |u_ij|^p per example)`` in float64 for ``u = round(mat · scale)``; rows where ``masked``
    is true are zero."""
    column_sum = torch.zeros(mat.shape[1], dtype=torch.float64, device=mat.device)
    row_powers = torch.empty(mat.shape[0], dtype=torch.float64, device=mat.device)
    ones = torch.ones(mat.shape[0], dtype=torch.float64, device=mat.device)
    mask = torch.zeros_like(ones, dtype=torch.bool) if masked is None else masked
    for block, rows, block_scale, block_mask, block_ones, block_powers in _blocks(
        mat, scale.unsqueeze(1), mask, ones, row_powers
    ):
        block.copy_(rows)  # exact; cheaper than letting the multiply promote a float32 operand
        block.mul_(block_scale)
        if masked is not None:  # a non-finite row times 0 would be NaN: overwrite the row instead
            block.masked_fill_(block_mask.unsqueeze(1), 0.0)
        block.round_()
        # Column sums as a matrix-vector product: any order of adding these integers is exact.
        column_sum.addmv_(block.t(), block_ones)
        _row_power_sums_(block, p, block_powers)
    return column_sum, row_powers


def _exact_group_sums(mats: Mapping[str, Tensor], clip: _GroupClip) -> dict[str, Tensor]:
    """The plain path, one group at a time on whole float64 copies: mask non-finite examples, clip, round to the
    grid (non-finite products, from factors that overflow, become 0), re-check each example's integers and sum
    those within the bound. Used where :func:`_fast_group_sums` bails out."""
    units: dict[str, Tensor] = {}
    for n, mat in mats.items():
        keep = clip.finite.view(-1, 1)
        wide = mat.double()
        contribution = torch.where(keep, wide, torch.zeros_like(wide)) * clip.factors.view(-1, 1)
        units[n] = to_grid(contribution.nan_to_num(0.0, 0.0, 0.0), clip.grid)
    within = clip.within(_integer_power_sums(units.values(), clip.p))
    return {n: torch.where(within.view(-1, 1), u, torch.zeros_like(u)).sum(0) for n, u in units.items()}


def _integer_power_sums(units: Iterable[Tensor], p: float) -> Tensor:
    """Per example, ``Σ_j |u_j|^p`` of int64 units across the group's parameters, in float64, each row summed as
    :func:`_row_power_sums_` sums it on the streaming path (contiguous, a lone row beside zeros)."""
    parts = []
    for u in units:
        out = torch.empty(u.shape[0], dtype=torch.float64, device=u.device)
        _row_power_sums_(u.double().contiguous(), p, out)
        parts.append(out)
    return torch.stack(parts).sum(0)
