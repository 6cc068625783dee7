"""Accountant speed for adaptive runs: ε after steps whose σ changes every step, new accountant vs old.

A budget guard in an adaptive DP-SGD run (a controller sets σ at each decision) asks the accountant "what is ε
after these steps" at every decision. With σ drawn anew at every step, 10,000 steps leave ~430 distinct σ on the
accountants' grid. For the PLD and the RDP accountant this script measures:

- **cold query**: ε of ``--steps`` steps, σ uniform in [``--sigma-low``, ``--sigma-high``] (seeded), Poisson
  rate ``--q``, δ = ``--delta``, with every module-level cache of the accounting package emptied first;
- **per decision**: then ``--decisions`` decisions, each the budget guard's check ``epsilon_with(history + the
  next --interval steps at a new σ)``, the steps recorded, and ``epsilon()`` of the history, as a controller's
  observation needs it;

for the accountant as it is (``new``) and as it was (``old``): every history composed as ``dp_accounting``
composes it (the pairwise path, forced with ``_exact_max_events``) and Gaussian PLDs built by ``dp_accounting``'s
``from_gaussian_mechanism``. The old path's ε is the old accountant's, bit for bit (the fast Gaussian PLD
construction reproduces ``dp_accounting``'s arrays exactly); only its time is that of the old code.

Usage::

    .venv/bin/python benchmarks/accountant_speed.py            # 10,000 steps: ~1 min, most of it the old PLD
    .venv/bin/python benchmarks/accountant_speed.py --quick    # a few seconds (the test suite runs it)

Results go to ``benchmarks/results/accountant_speed.{json,md}`` (``--out`` to change; ``--out ''`` to only print).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, cpu_model, publish

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# the measurement's settings (each a command-line option: --steps, --sigma-low, ...) and the --quick ones
DEFAULTS: dict[str, Any] = {
    "steps": 10_000,
    "sigma_low": 0.6,
    "sigma_high": 1.6,
    "q": 0.0128,
    "delta": 1e-5,
    "seed": 0,
    "decisions": 20,
    "interval": 10,  # steps per decision
}
QUICK = {"steps": 24, "decisions": 3, "interval": 4}


def clear_caches() -> None:
    """Empty every module-level cache of the accounting package, so that a query starts cold."""
    from dplightning.privacy import accounting

    for value in vars(accounting).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()
    gc.collect()


@contextlib.contextmanager
def old_pld_construction() -> Iterator[None]:
    """Gaussian PLDs and their loss ranges from ``dp_accounting``'s objects, as the accountant built them before."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    from dp_accounting.pld import privacy_loss_mechanism as pld_mechanism

    from dplightning.privacy.accounting import pld

    def build(sigma: float, q: float, interval: float) -> Any:
        return pld_lib.from_gaussian_mechanism(
            standard_deviation=sigma, sampling_prob=q, value_discretization_interval=interval
        )

    def loss_range(sigma: float, q: float) -> float:
        adjacencies = [pld_mechanism.AdjacencyType.REMOVE]
        if q < 1.0:
            adjacencies.append(pld_mechanism.AdjacencyType.ADD)
        width = 0.0
        with np.errstate(all="ignore"):
            for adjacency in adjacencies:
                loss = pld_mechanism.GaussianPrivacyLoss(sigma, sampling_prob=q, adjacency_type=adjacency)
                bounds = loss.connect_dots_bounds()
                width = max(width, float(bounds.epsilon_upper - bounds.epsilon_lower))
        return width if math.isfinite(width) else math.inf

    saved = pld.gaussian_pld, pld.gaussian_loss_range
    pld.gaussian_pld, pld.gaussian_loss_range = build, loss_range
    try:
        yield
    finally:
        pld.gaussian_pld, pld.gaussian_loss_range = saved


def timed(fn: Any) -> tuple[Any, float, float]:
    """``(fn(), wall seconds, CPU seconds)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def measure(kind: str, path: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """One accountant, one path: the cold query, then the decisions."""
    from dplightning.privacy.accounting import StepEvent, make_accountant

    rng = np.random.default_rng(cfg["seed"])
    sigmas = rng.uniform(cfg["sigma_low"], cfg["sigma_high"], cfg["steps"] + cfg["decisions"])
    q, delta = cfg["q"], cfg["delta"]
    clear_caches()
    with old_pld_construction() if path == "old" else contextlib.nullcontext():
        acc = make_accountant(kind)  # type: ignore[arg-type]
        if path == "old":
            acc._exact_max_events = math.inf
        for sigma in sigmas[: cfg["steps"]]:
            acc.step(float(sigma), q)
        load = os.getloadavg()
        epsilon, wall, cpu = timed(lambda: acc.epsilon(delta))
        out: dict[str, Any] = {
            "kind": kind,
            "path": path,
            "distinct_sigmas": len(acc.history),
            "epsilon": epsilon,
            "cold_seconds": wall,
            "cold_cpu_seconds": cpu,
            "loadavg_before": load,
        }
        guard, decision = [], []
        for sigma in sigmas[cfg["steps"] :]:
            event = StepEvent(float(sigma), q)
            _, check, _ = timed(lambda e=event: acc.epsilon_with(delta, [(e, cfg["interval"])]))
            acc.record(event, cfg["interval"])
            _, after, _ = timed(lambda: acc.epsilon(delta))
            guard.append(check)
            decision.append(check + after)
        out |= {
            "guard_seconds": guard,
            "decision_seconds": decision,
            "epsilon_after_decisions": acc.epsilon(delta),
            "loadavg_after": os.getloadavg(),
        }
    return out


# ----------------------------------------------------------------------------------------------- report


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per accountant: new vs old ε (relative difference, new ≥ old) and speed-ups."""
    out: dict[str, Any] = {}
    for kind in sorted({r["kind"] for r in runs}):
        pick = {r["path"]: r for r in runs if r["kind"] == kind}
        old, new = pick["old"], pick["new"]
        out[kind] = {
            "relative_difference": new["epsilon"] / old["epsilon"] - 1,
            "new_at_least_old": new["epsilon"] >= old["epsilon"],
            "relative_difference_after_decisions": new["epsilon_after_decisions"]
            / old["epsilon_after_decisions"]
            - 1,
            "new_at_least_old_after_decisions": new["epsilon_after_decisions"]
            >= old["epsilon_after_decisions"],
            "cold_speedup": old["cold_seconds"] / new["cold_seconds"],
            "decision_speedup": statistics.mean(old["decision_seconds"])
            / statistics.mean(new["decision_seconds"]),
        }
    return out


def markdown(record: dict[str, Any]) -> str:
    cfg, machine = record["config"], record["machine"]
    lines = [
        "# Accountant speed for adaptive runs",
        "",
        f"Command: `{record['command']}` ({record['date']})",
        "",
        f"{cfg['steps']} steps, σ uniform in [{cfg['sigma_low']:g}, {cfg['sigma_high']:g}] at every step "
        f"(seed {cfg['seed']}), Poisson rate q = {cfg['q']:g}, δ = {cfg['delta']:g}; then {cfg['decisions']} "
        f"decisions of {cfg['interval']} steps each at a new σ. Machine: {machine['nproc']} cores "
        f"({machine['cpu']}), Python {machine['python']}, shared: the load average (1, 5, 15 min) is given next to "
        "each timing. `old`: the accountant before the vectorised paths (pairwise composition of every σ, "
        "`dp_accounting`'s Gaussian PLD construction); its ε is the old accountant's.",
        "",
        "Cold query: the first `epsilon(δ)` of the history, every cache empty. Decision: the budget guard's "
        "`epsilon_with(history + next steps)`, then `epsilon(δ)` after recording them.",
        "",
        "| accountant | path | distinct σ | ε | cold query s | CPU s | load before | guard check s, mean | "
        "decision s, mean / max | ε after decisions | load after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        load = ", ".join(f"{x:.2f}" for x in r["loadavg_before"])
        after = ", ".join(f"{x:.2f}" for x in r["loadavg_after"])
        lines.append(
            f"| {r['kind']} | {r['path']} | {r['distinct_sigmas']} | {r['epsilon']:.10g} | {r['cold_seconds']:.3f} "
            f"| {r['cold_cpu_seconds']:.3f} | {load} | {statistics.mean(r['guard_seconds']):.4f} "
            f"| {statistics.mean(r['decision_seconds']):.4f} / {max(r['decision_seconds']):.4f} "
            f"| {r['epsilon_after_decisions']:.10g} | {after} |"
        )
    lines += [
        "",
        "| accountant | ε new / old − 1 | new ≥ old | after decisions: new / old − 1 | cold speed-up "
        "| decision speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for kind, s in record["summary"].items():
        lines.append(
            f"| {kind} | {s['relative_difference']:+.3e} | {s['new_at_least_old']} "
            f"| {s['relative_difference_after_decisions']:+.3e} | {s['cold_speedup']:.1f}x "
            f"| {s['decision_speedup']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--kinds", nargs="+", default=["pld", "rdp"], choices=["pld", "rdp"])
    parser.add_argument("--quick", action="store_true", help=f"a small run: {QUICK}")
    parser.add_argument(
        "--out", default=str(RESULTS / "accountant_speed"), help="results prefix; '' to only print"
    )
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    cfg = {key: getattr(args, key) for key in DEFAULTS}
    import dp_accounting
    import scipy

    record: dict[str, Any] = {
        "command": command_line("accountant_speed.py", argv),
        "date": dt.date.today().isoformat(),
        "config": cfg,
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "dp_accounting": getattr(dp_accounting, "__version__", None),
            "loadavg_at_start": os.getloadavg(),
        },
        "runs": [measure(kind, path, cfg) for kind in args.kinds for path in ("new", "old")],
    }
    record["summary"] = summary(record["runs"])
    publish(record, markdown(record), args.out or None)
    return record


if __name__ == "__main__":
    main()
