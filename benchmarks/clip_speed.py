"""Speed of the private step's exact clip-and-sum, ``clip_to_grid_and_sum``: the streaming path against the
whole-tensor implementation it replaced (kept below as the reference).

Input: per-example gradients of SmolLM2-135M's LoRA adapters (rank 8 on ``q_proj`` and ``v_proj`` of its 30
layers: ``lora_A`` ``[8, 576]``, ``lora_B`` ``[576, 8]`` / ``[192, 8]``, 460,800 numbers per example) for a
batch of 128, float32, each example's norm log-uniform in [C/10, 10·C] so that some are clipped and some not.
Both implementations run on the same input, interleaved (alternating which goes first), on one thread; their
int64 sums and per-example norms must be identical, bit for bit, or the script fails.

Usage::

    .venv/bin/python benchmarks/clip_speed.py            # 7 calls of each: ~15 s on one core
    .venv/bin/python benchmarks/clip_speed.py --quick    # a tiny run (the test suite runs it)

The report goes to ``benchmarks/results/clip_speed.md`` (``--out`` to change; ``--out ''`` to only print).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, cpu_model

from dplightning.checkpoint_io import atomic_write
from dplightning.privacy.clipping import (
    CLIPPING_MODES,
    clip_factors,
    clip_to_grid_and_sum,
    group_grids,
    make_groups,
)
from dplightning.privacy.discretization import CLIP_MARGIN, to_grid

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# SmolLM2-135M (its config.json): hidden size 576, 30 layers, 3 key-value heads of 64 → v_proj outputs 192.
DEFAULTS: dict[str, Any] = {
    "batch": 128,
    "layers": 30,
    "hidden": 576,
    "kv_dim": 192,
    "rank": 8,
    "threshold": 1.0,
    "repeats": 7,
    "threads": 1,
    "seed": 0,
}
QUICK = {"batch": 6, "layers": 2, "repeats": 2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ---------------------------------------------------------------------------------- reference (old code)
# The implementation ``clip_to_grid_and_sum`` had before the streaming path, copied verbatim: whole-tensor
# float64 copies, ``torch.where`` / ``nan_to_num`` masking, int64 units and a float64 copy of them for the
# re-check. It is the yardstick for both speed and output.
def reference_per_example_norms(
    grads: Mapping[str, Tensor], groups: Mapping[str, Sequence[str]], p: float = 2.0
) -> dict[str, Tensor]:
    norms: dict[str, Tensor] = {}
    for group, names in groups.items():
        if p == 1.0:
            parts = [grads[n].flatten(1).abs().sum(1) for n in names]
            norms[group] = torch.stack(parts).sum(0)
        else:
            parts = [grads[n].flatten(1).pow(2).sum(1) for n in names]
            norms[group] = torch.stack(parts).sum(0).sqrt()
    return norms


def reference_clip_to_grid_and_sum(
    grads: Mapping[str, Tensor],
    groups: Mapping[str, Sequence[str]],
    thresholds: Mapping[str, float],
    grids: Mapping[str, float],
    p: float = 2.0,
    stability: float | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    wide = {n: g.detach().double() for n, g in grads.items()}
    norms = reference_per_example_norms(wide, groups, p)
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
        within = _reference_within_sensitivity(units, thresholds[group] / grids[group], p)
        for n, u in units.items():
            summed[n] = torch.where(within.view(-1, *([1] * (u.dim() - 1))), u, torch.zeros_like(u)).sum(0)
    return summed, norms


def _reference_within_sensitivity(units: Mapping[str, Tensor], bound: float, p: float) -> Tensor:
    parts = [u.flatten(1).double() for u in units.values()]
    if p == 1.0:
        norm = torch.stack([x.abs().sum(1) for x in parts]).sum(0)
    else:
        norm = torch.stack([x.pow(2).sum(1) for x in parts]).sum(0).sqrt()
    return norm <= bound * (1.0 - CLIP_MARGIN / 4)


# ------------------------------------------------------------------------------------------------ input
def lora_shapes(layers: int, hidden: int, kv_dim: int, rank: int) -> dict[str, tuple[int, int]]:
    """``{parameter name: shape}`` of rank-``rank`` LoRA adapters on q_proj and v_proj, as PEFT names them."""
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(layers):
        for proj, out in (("q_proj", hidden), ("v_proj", kv_dim)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            shapes[f"{prefix}.lora_A.default.weight"] = (rank, hidden)
            shapes[f"{prefix}.lora_B.default.weight"] = (out, rank)
    return shapes


def make_grads(cfg: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Tensor]:
    """Per-example gradients ``[B, *shape]``: Gaussian directions, each example's whole-model norm
    log-uniform in [C/10, 10·C]."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    shapes = lora_shapes(cfg["layers"], cfg["hidden"], cfg["kv_dim"], cfg["rank"])
    dim = sum(math.prod(s) for s in shapes.values())
    batch = cfg["batch"]
    scale = cfg["threshold"] * 10.0 ** (2 * torch.rand(batch, generator=gen) - 1) / math.sqrt(dim)
    return {
        name: (torch.randn(batch, *shape, generator=gen) * scale.view(-1, 1, 1)).to(dtype)
        for name, shape in shapes.items()
    }


# -------------------------------------------------------------------------------------------- measuring
Impl = Callable[..., tuple[dict[str, Tensor], dict[str, Tensor]]]


def assert_identical(
    new: tuple[dict[str, Tensor], dict[str, Tensor]], ref: tuple[dict[str, Tensor], ...]
) -> None:
    """The int64 sums and the per-example norms of both implementations agree bit for bit."""
    assert new[0].keys() == ref[0].keys() and new[1].keys() == ref[1].keys()
    for name, units in ref[0].items():
        assert units.dtype == new[0][name].dtype == torch.int64, name
        assert torch.equal(units, new[0][name]), f"summed units differ for {name}"
    for group, norm in ref[1].items():
        assert torch.equal(norm.isnan(), new[1][group].isnan()), group
        assert torch.equal(norm.nan_to_num(0.0), new[1][group].nan_to_num(0.0)), f"norms differ for {group}"


def measure(cfg: Mapping[str, Any], dtype: torch.dtype, clipping: str, poison: bool) -> dict[str, Any]:
    """Times of ``repeats`` calls of each implementation on one input, interleaved and alternating order."""
    grads = make_grads(cfg, dtype)
    if poison:  # one example's gradient is NaN in one tensor: it must contribute 0 to its group
        next(iter(grads.values()))[0].fill_(math.nan)
    groups = make_groups(list(grads), clipping)  # type: ignore[arg-type]
    thresholds = dict.fromkeys(groups, cfg["threshold"] / math.sqrt(len(groups)))
    p = 1.0 if clipping == "flat_l1" else 2.0
    grids = group_grids(groups, {n: g.shape[1:].numel() for n, g in grads.items()}, thresholds, p)
    impls: dict[str, Impl] = {"new": clip_to_grid_and_sum, "reference": reference_clip_to_grid_and_sum}
    outputs = {k: f(grads, groups, thresholds, grids, p=p) for k, f in impls.items()}  # warm-up, and checked
    assert_identical(outputs["new"], outputs["reference"])
    times: dict[str, list[float]] = {k: [] for k in impls}
    load_before = os.getloadavg()
    for rep in range(cfg["repeats"]):
        for key in sorted(impls, reverse=bool(rep % 2)):
            start = time.perf_counter()
            impls[key](grads, groups, thresholds, grids, p=p)
            times[key].append(time.perf_counter() - start)
    return {
        "times": times,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "groups": len(groups),
        "numbers_per_example": sum(g.shape[1:].numel() for g in grads.values()),
        "tensors": len(grads),
    }


# ------------------------------------------------------------------------------------------------ report
def _load(values: Sequence[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def markdown(record: dict[str, Any]) -> str:
    cfg, run = record["config"], record["run"]
    new, ref = run["times"]["new"], run["times"]["reference"]
    poisoned = ", one example's gradient NaN" if record["poison"] else ""
    lines = [
        "# Exact clip-and-sum speed",
        "",
        f"Command: `{record['command']}` ({record['date']})",
        "",
        f"`clip_to_grid_and_sum` on {run['tensors']} per-example gradient tensors ({run['numbers_per_example']:,} "
        f"numbers per example: LoRA rank {cfg['rank']} on q_proj and v_proj of {cfg['layers']} layers, hidden "
        f"{cfg['hidden']}, v_proj output {cfg['kv_dim']}), batch {cfg['batch']}, {record['dtype']}, clipping "
        f"`{record['clipping']}` ({run['groups']} group(s)), C = {cfg['threshold']:g}, per-example norms "
        f"log-uniform in [C/10, 10·C]{poisoned}. {cfg['repeats']} calls of each implementation, interleaved, alternating "
        f"which goes first; torch {record['machine']['torch']}, {cfg['threads']} thread(s), "
        f"{record['machine']['nproc']} cores ({record['machine']['cpu']}). The machine is shared: load average "
        f"(1, 5, 15 min) {_load(run['loadavg_before'])} before the timed calls, {_load(run['loadavg_after'])} after.",
        "",
        "`reference`: the implementation before the streaming path (whole-tensor float64 copies, `torch.where` / "
        "`nan_to_num` masks, int64 units and a float64 copy of them for the re-check), kept in the script. Its "
        "int64 sums and per-example norms are identical to the new path's, bit for bit (asserted on this input).",
        "",
        "| implementation | median s | min s | all calls, s |",
        "|---|---|---|---|",
    ]
    for key, times in (("new", new), ("reference", ref)):
        calls = " ".join(f"{t:.3f}" for t in times)
        lines.append(f"| {key} | {statistics.median(times):.4f} | {min(times):.4f} | {calls} |")
    lines += [
        "",
        f"Speed-up (reference / new): **{record['speedup_median']:.1f}x** on medians, "
        f"{record['speedup_min']:.1f}x on minima.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--clipping", choices=CLIPPING_MODES, default="flat")
    parser.add_argument("--poison", action="store_true", help="make one example's gradient NaN")
    parser.add_argument("--quick", action="store_true", help=f"a tiny run: {QUICK}")
    parser.add_argument("--out", default=str(RESULTS / "clip_speed.md"), help="report path; '' to only print")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    cfg = {key: getattr(args, key) for key in DEFAULTS}
    torch.set_num_threads(cfg["threads"])
    run = measure(cfg, DTYPES[args.dtype], args.clipping, args.poison)
    new, ref = run["times"]["new"], run["times"]["reference"]
    record: dict[str, Any] = {
        "command": command_line("clip_speed.py", argv),
        "date": dt.date.today().isoformat(),
        "config": cfg,
        "dtype": args.dtype,
        "clipping": args.clipping,
        "poison": args.poison,
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__},
        "run": run,
        "speedup_median": statistics.median(ref) / statistics.median(new),
        "speedup_min": min(ref) / min(new),
    }
    report = markdown(record)
    print(report)
    if args.out:
        atomic_write(args.out, lambda fh: fh.write(report.encode()))
        print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
