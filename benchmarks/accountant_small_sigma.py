"""Accountant queries at tiny noise multipliers: time and ε of PLD (with and without its size guard) and RDP.

With the PLD arrays spanning the privacy-loss range (≈ 1/σ² nats) at 5e-4 resolution, σ = 1e-6 used to ask for
petabytes and σ = 0.01 ran for minutes. The PLD accountant now estimates each array's size first and coarsens
its loss grid (pessimistic discretisation stays an upper bound) or, past the coarsest usable grid, falls back
to RDP (``dplightning.privacy.accounting``, "Tiny noise"). This script measures, for σ in ``--sigmas`` and q
in ``--rates`` (``--steps`` Poisson-sampled Gaussian releases, δ = ``--delta``):

- **PLD** (guarded): ``compute_epsilon`` in a fresh process (cold caches), the loss grid it used, and what a
  training step costs — the strategies' budget guard ``epsilon_with(history + 1 step)`` on a recorded history;
- **PLD without the guard** (``PLD_MAX_POINTS`` raised to 2^62, i.e. the previous behaviour), in a process
  limited to ``--memory-gib`` of address space and ``--timeout`` seconds;
- **RDP**: the same query with the RDP accountant — also what the PLD accountant would report had it fallen
  back to RDP instead of coarsening (the alternative this benchmark decides against: compare the ε columns);
- a smaller table for Laplace and LMO noise (guarded only).

Every measurement runs in its own process, so the timings include building every cached PLD / RDP curve.

Usage::

    .venv/bin/python benchmarks/accountant_small_sigma.py

Results go to ``benchmarks/results/accountant_small_sigma.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, quiet, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NO_GUARD_POINTS = 2**62  # PLD_MAX_POINTS that never coarsens: the accountant as it was before the guard


# ------------------------------------------------------------------------------------------ child process


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One query, timed from cold caches: ε, seconds, the PLD grid, and the per-step budget-guard cost."""
    from dplightning.privacy import accounting
    from dplightning.privacy.accounting import StepEvent, compute_epsilon, make_accountant
    from dplightning.privacy.mechanisms import LMOMechanism

    if not job["guard"]:
        accounting.PLD_MAX_POINTS = NO_GUARD_POINTS  # read at query time; nothing is cached yet
    lmo = LMOMechanism.laplace(1.0) if job["mechanism"] == "lmo" else None
    args = (job["sigma"], job["q"], job["steps"], job["delta"], job["kind"], job["mechanism"], lmo)
    start = time.perf_counter()
    eps = compute_epsilon(*args)
    out: dict[str, Any] = {"epsilon": eps, "seconds": time.perf_counter() - start}
    event = StepEvent(job["sigma"], job["q"], job["mechanism"], lmo)
    if job["kind"] == "pld":
        canonical = make_accountant("pld")._canonical(event)
        grid = accounting._leaf_interval(canonical, job["steps"], accounting.DEFAULT_VALUE_DISCRETIZATION)
        out["grid"] = grid if math.isfinite(grid) else "rdp"
    if job.get("guard_step"):
        acc = make_accountant(job["kind"])
        acc.record(event, job["steps"])
        acc.epsilon(job["delta"])  # the history, composed once (a training run has it cached)
        start = time.perf_counter()
        for _ in range(3):
            acc.epsilon_with(job["delta"], [(event, 1)])
        out["guard_seconds"] = (time.perf_counter() - start) / 3
        start = time.perf_counter()
        acc.record(event, 1)  # the step itself: the history changes and is recomposed at the next query
        acc.epsilon(job["delta"])
        out["step_seconds"] = time.perf_counter() - start
    return out


def child(spec: str) -> None:
    job = json.loads(spec)
    limit = int(job["memory_gib"] * 2**30)
    resource.setrlimit(
        resource.RLIMIT_AS, (limit, limit)
    )  # a petabyte request fails fast instead of swapping
    quiet()
    try:
        out = measure(job)
    except MemoryError:
        out = {"error": "MemoryError"}
    except Exception as exc:  # what the unguarded accountant does at tiny σ is part of the result
        out = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
    print(json.dumps(out, default=str))


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(job)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {**job, "error": f"timeout after {timeout:g} s", "wall_seconds": time.perf_counter() - start}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        out = {"error": f"exit {proc.returncode}: {tail[:120]}"}
    else:
        out = json.loads(lines[-1])
    return {**job, **out, "wall_seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------- report


def fmt_eps(row: dict[str, Any]) -> str:
    if "error" in row:
        return "—"
    eps = row["epsilon"]
    return "inf" if eps == math.inf else f"{eps:.6g}"


def fmt_time(row: dict[str, Any], key: str = "seconds") -> str:
    if "error" in row:
        return row["error"]
    return f"{row[key]:.3f}" if key in row else ""


def fmt_grid(row: dict[str, Any]) -> str:
    grid = row.get("grid", "")
    return grid if isinstance(grid, str) else f"{grid:.4g}"


def markdown(record: dict[str, Any]) -> str:
    cfg = record["config"]
    lines = [
        "# Accountant queries at tiny noise multipliers",
        "",
        f"Command: `{record['command']}`",
        "",
        f"{cfg['steps']} Poisson-sampled releases, δ = {cfg['delta']:g}. Each cell is one fresh process "
        f"(cold caches). Machine: {record['machine']['nproc']} cores ({record['machine']['cpu']}), load at "
        f"start {[round(x, 2) for x in record['machine']['loadavg_at_start']]}; timings are of this shared "
        "machine.",
        "",
        "PLD grid: the loss discretisation the guarded accountant chose (5e-4 is the configured one; `rdp`:",
        "the fallback). Guard / step: a training step's budget check `epsilon_with(history + 1 step)` on a",
        f"recorded history of {cfg['steps']} steps, and the recomposition after the step. Without the guard:",
        f"the previous behaviour, limited to {cfg['memory_gib']:g} GiB of address space and "
        f"{cfg['timeout']:g} s.",
        "",
    ]
    rows = record["gaussian"]
    for q in cfg["rates"]:
        lines += [
            f"## Gaussian, q = {q:g}",
            "",
            "| σ | PLD grid | PLD ε | PLD s | guard s | step s | PLD without guard ε | without guard s "
            "| RDP ε | RDP s | RDP ε / PLD ε |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for sigma in cfg["sigmas"]:
            pick = {r["variant"]: r for r in rows if r["q"] == q and r["sigma"] == sigma}
            pld, raw, rdp = pick["pld"], pick["pld_unguarded"], pick["rdp"]
            ratio = ""
            if "error" not in pld and "error" not in rdp and 0 < pld["epsilon"] < math.inf:
                ratio = f"{rdp['epsilon'] / pld['epsilon']:.3g}"
            lines.append(
                f"| {sigma:g} | {fmt_grid(pld)} | {fmt_eps(pld)} | {fmt_time(pld)} "
                f"| {fmt_time(pld, 'guard_seconds')} | {fmt_time(pld, 'step_seconds')} | {fmt_eps(raw)} "
                f"| {fmt_time(raw)} | {fmt_eps(rdp)} | {fmt_time(rdp)} | {ratio} |"
            )
        lines.append("")
    lines += [
        "## Laplace and LMO noise (guarded)",
        "",
        "LMO: `LMOMechanism.laplace(1.0)` (K = 1), scalar release; past a worst-case loss of 700 nats per",
        "release (multiplier < 1/700) both accountants use its pure-DP bound.",
        "",
        "| mechanism | accountant | q | σ | PLD grid | ε | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["other"]:
        lines.append(
            f"| {r['mechanism']} | {r['kind']} | {r['q']:g} | {r['sigma']:g} | {fmt_grid(r)} | {fmt_eps(r)} "
            f"| {fmt_time(r)} |"
        )
    lines += ["", *record["notes"], ""]
    return "\n".join(lines)


def rdp_row(record: dict[str, Any], pld: dict[str, Any]) -> dict[str, Any]:
    """The RDP measurement of the same (σ, q) as the PLD row ``pld``."""
    return next(
        r
        for r in record["gaussian"]
        if r["variant"] == "rdp" and r["sigma"] == pld["sigma"] and r["q"] == pld["q"]
    )


def notes(record: dict[str, Any]) -> list[str]:
    """Summary lines computed from the measurements (so the report cannot drift from the numbers)."""
    rows = [r for r in record["gaussian"] if r["sigma"] in record["config"]["small_sigmas"]]
    guarded = [r for r in rows if r["variant"] == "pld" and "error" not in r]
    unguarded = [r for r in rows if r["variant"] == "pld_unguarded"]
    coarse = [r for r in guarded if r.get("grid") not in (None, "rdp", record["config"]["interval"])]
    out = ["## Summary", ""]
    if guarded:
        out.append(
            f"- Guarded PLD, σ ∈ {record['config']['small_sigmas']}: slowest cold query "
            f"{max(r['seconds'] for r in guarded):.2f} s, slowest budget-guard check "
            f"{max(r.get('guard_seconds', 0) for r in guarded):.2f} s."
        )
    failed = [r for r in unguarded if "error" in r]
    out.append(
        f"- Without the guard {len(failed)} of {len(unguarded)} of these queries did not answer "
        f"({', '.join(sorted({r['error'].split(':')[0] for r in failed})) or 'none'})."
    )
    for q in sorted({r["q"] for r in coarse}):
        pairs = [(r, rdp_row(record, r)) for r in coarse if r["q"] == q]
        ratios = [rdp["epsilon"] / pld["epsilon"] for pld, rdp in pairs]
        out.append(
            f"- Where the PLD grid was coarsened (q = {q:g}), RDP — the alternative fallback — reports "
            f"{min(ratios):.3g}–{max(ratios):.3g}× the coarse PLD's ε; slowest cold query: coarse PLD "
            f"{max(p['seconds'] for p, _ in pairs):.2f} s, RDP {max(r['seconds'] for _, r in pairs):.2f} s."
        )
    return out


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1e-6, 1e-3, 0.01, 0.05, 0.1, 0.3, 1.0])
    parser.add_argument("--small-sigmas", type=float, nargs="+", default=[1e-6, 1e-3, 0.01, 0.05])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 1.0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per query without the guard")
    parser.add_argument("--memory-gib", type=float, default=8.0, help="address-space limit per query process")
    parser.add_argument("--out", type=Path, default=RESULTS / "accountant_small_sigma")
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    quiet()
    from dplightning.privacy.accounting import DEFAULT_VALUE_DISCRETIZATION

    base = {"steps": args.steps, "delta": args.delta, "memory_gib": args.memory_gib}
    record: dict[str, Any] = {
        "command": command_line("accountant_small_sigma.py"),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(packages=("numpy", "scipy")),
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("child", "out")},
            "interval": DEFAULT_VALUE_DISCRETIZATION,
        },
        "gaussian": [],
        "other": [],
    }
    for q in args.rates:
        for sigma in args.sigmas:
            job = {**base, "sigma": sigma, "q": q, "mechanism": "gaussian"}
            for variant, extra, timeout in (
                ("pld", {"kind": "pld", "guard": True, "guard_step": True}, 600.0),
                ("pld_unguarded", {"kind": "pld", "guard": False}, args.timeout),
                ("rdp", {"kind": "rdp", "guard": True, "guard_step": True}, 600.0),
            ):
                row = {"variant": variant, **run_job({**job, **extra}, timeout)}
                record["gaussian"].append(row)
                print(
                    f"gaussian q={q:g} σ={sigma:g} {variant}: ε={fmt_eps(row)} {fmt_time(row)} s "
                    f"grid={fmt_grid(row)}",
                    flush=True,
                )
    for mechanism, kind, q in (
        ("laplace", "pld", 1.0),
        ("laplace", "pld", 0.01),
        ("laplace", "rdp", 1.0),
        ("lmo", "pld", 1.0),
        ("lmo", "pld", 0.01),
        ("lmo", "rdp", 0.01),
    ):
        for sigma in args.small_sigmas:
            job = {**base, "sigma": sigma, "q": q, "mechanism": mechanism, "kind": kind, "guard": True}
            row = run_job(job, 600.0)
            record["other"].append(row)
            print(f"{mechanism} {kind} q={q:g} σ={sigma:g}: ε={fmt_eps(row)} {fmt_time(row)} s", flush=True)
    record["notes"] = notes(record)
    write_results(str(args.out), record, markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
