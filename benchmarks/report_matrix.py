"""The matrix report: ``<out>/README.md`` and its plots, from ``<out>/recipe_sweep.jsonl`` and ``plan.json`` only.

``run_matrix.py`` calls :func:`report` after every cell, so any subset of the grid may have finished: a cell that
has not run shows as "–" or "not yet run", never as an error, and an empty results directory gives a README that
says nothing has finished yet. For each cell the newest ``ok`` row is used, and only the rows of the current
regime (the plan's task when it records one, else the newest matrix row's; the staged RLDP prior is no part of the
regime) are compared; rows of other regimes are counted and left out.

Sections: the regime, the command, DP-ZO's step calibration and the RLDP variant; every tuning cell with the
chosen one marked (dpsgd_flat's live in ``rldp_decide.py``'s results, ``plan["decide_out"]``); per ε, a table of
utility and cost and one of the audits, a row per method with the two references (pretrained, non-private) in
every ε; the targets, paired by seed; the audit-power control; which method wins at which ε; the plots.

Rules the targets are judged by (stated again in the README):

* **RLDP vs DP-SGD flat, test perplexity**: the per-seed relative difference (RLDP − flat) / flat; met when its
  mean over the paired seeds is < 0.
* **Steps to DP-SGD flat's final validation perplexity**: the first step at which RLDP's validation curve is at or
  below flat's last validation perplexity (same ε and seed), linearly interpolated between the two validations
  around the crossing, as a fraction of flat's steps; met when every paired seed reaches it and the mean fraction
  is ≤ 60 %.
* **MIA loss AUC no worse**: met when the mean paired difference (RLDP − flat) ≤ 2 × its standard error, from the
  paired differences over seeds (one seed: one cell's Hanley–McNeil SE; the two cells score the same notes, so
  their AUCs are correlated and adding their SEs as if independent would be lenient).
* **Canary exposure no worse** (canaries inserted once, the ones DP protects): met when the mean paired
  difference ≤ max(0, sd of the never-inserted canaries' exposure over the same cells), i.e. no larger than the
  spread that chance alone gives a cell's mean exposure.
* **DP-ZO's downstream targets** are judged in the downstream block (T = 128, ε = 2): DP-ZO Gaussian's accuracy
  ≥ DP-SGD flat's − 5 points (mean paired difference); DP-ZO Laplace "clearly above" the base model when its mean
  accuracy exceeds the base's by more than 2 binomial SEs of the base's accuracy on the scored notes. In the ε
  tables, DP-ZO's gap closed beside DP-SGD's is shown as a labelled proxy.
* **Audit power**: the attack finds the control's members when its AUC − 2 SE > 0.5.

By hand::

    .venv/bin/python benchmarks/report_matrix.py                 # benchmarks/results/matrix
    .venv/bin/python benchmarks/report_matrix.py --out /tmp/mq   # another results directory
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recipe_sweep as sweep
import rldp_decide as decide
import rldp_trajectories as trajectories
import run_matrix as matrix
from cells import ROOT
from common import format_or_dash

Row = dict[str, Any]
Key = tuple[str, float | None, int | None]  # (method, ε or None, seed or None)
README = "README.md"
REFERENCES = ("pretrained", "nonprivate")  # no budget: the same cells in every ε table
STEPS_TARGET = 0.60  # RLDP reaches DP-SGD's final validation perplexity within this share of its steps
SE_FACTOR = 2.0  # "no worse" and "finds the members": beyond two standard errors
MIN_SEEDS = len(matrix.SEEDS)  # fewer seeds than the plan's default: a ranking is provisional
CONTROLLERS = {
    "rldp_prior": "RLDP from the pre-trained prior (rldp_decide.py's M7)",
    "rldp": "RLDP online from scratch (rldp_decide.py's M6)",
}
NOT_YET = "not yet run"


# ------------------------------------------------------------------------------------------------ the rows
@dataclass(frozen=True)
class Results:
    """The matrix's finished cells of the current regime, indexed for the tables."""

    cells: dict[str, Row]  # cell name -> newest ok row (matrix rows only: those with a role)
    grid: dict[Key, Row]  # (method, ε, seed) -> row, role grid
    left_out: int  # finished matrix cells of another regime, or run with settings the plan no longer chooses
    failed: list[str]  # cells whose newest attempt failed and that have no ok row


def _eps(value: float | None) -> float | None:
    """An ε as a key: JSON floats of the same ε compare equal after rounding."""
    return None if value is None else round(float(value), 9)


def regime(task: dict[str, Any]) -> dict[str, Any]:
    """What makes two rows comparable: the task without the staged prior's path (it changes only RLDP's cells)."""
    return {k: v for k, v in task.items() if k != "policy_path"}


def matrix_rows(rows: list[Row]) -> list[Row]:
    """The ok matrix rows (those with a role; rldp_decide's may share the file), in the order they were written."""
    return [r for r in rows if r["status"] == "ok" and r["settings"].get("role")]


def load_results(out: Path, plan: dict[str, Any]) -> Results:
    rows = sweep.load_rows(out / sweep.JSONL)
    written = matrix_rows(rows)
    newest = {r["cell"]: r for r in written}  # a rerun cell: its newest row
    # the plan does not record its task (yet): the newest matrix row's stands in
    task = plan.get("task") or (next((r["task"] for r in reversed(written) if not _downstream(r)), {}))
    # the downstream block (and its timing runs) has a task of its own
    downstream_task = (plan.get("downstream") or {}).get("task")
    cells = {
        name: r
        for name, r in newest.items()
        if regime(r["task"]) == regime(task)
        or (downstream_task is not None and regime(r["task"]) == regime(downstream_task))
    }
    # a grid or downstream row run with other settings than the plan's choice (an earlier choice, another prior)
    cells = {name: r for name, r in cells.items() if follows_plan(r, plan)}
    grid: dict[Key, Row] = {}
    for row in cells.values():
        s = row["settings"]
        if s["role"] == "grid":
            grid[(s["method"], _eps(s.get("epsilon")), s.get("seed"))] = row
    newest_attempt = {r["cell"]: r for r in rows}
    failed = sorted(name for name, r in newest_attempt.items() if r["status"] != "ok")
    return Results(cells, grid, len(newest) - len(cells), failed)


SETTING_KEYS = (
    "optimizer",
    "momentum",
    "lr",
    "schedule",
    "clip",
    "grad_clip",
    "mu",
    "noise",
    "steps",
    "controller",
)


def follows_plan(row: Row, plan: dict[str, Any]) -> bool:
    """Whether a grid or downstream row has the settings the plan's tuned choice gives its method (other rows,
    and any row while the plan has no choice for its method, pass)."""
    s = row["settings"]
    tuned = (plan.get("tuned") or {}).get(s["method"])
    if s["role"] not in ("grid", "downstream") or tuned is None or s["method"] == "pretrained":
        return True
    settings = dict(tuned)
    if s["method"].startswith("dpzo") and s["role"] == "downstream":
        timing = (plan.get("downstream") or {}).get("timing") or {}
        settings["steps"] = timing.get("zo_steps", s.get("steps"))
    expected = matrix.method_cell(s["method"], settings, s.get("epsilon"), s.get("seed", 0))
    defaults = {"schedule": "constant"}
    return all(s.get(key, defaults.get(key)) == expected.get(key, defaults.get(key)) for key in SETTING_KEYS)


def _downstream(row: Row) -> bool:
    return row["settings"].get("role") == "downstream" or row["cell"].startswith("timing_downstream")


def load_plan(out: Path) -> dict[str, Any] | None:
    path = out / matrix.PLAN
    return json.loads(path.read_text()) if path.exists() else None


def by_seed(results: Results, method: str, epsilon: float | None) -> dict[int | None, Row]:
    """seed -> row of ``method`` at ε (the references at any ε: their own cells)."""
    eps = None if method in REFERENCES else _eps(epsilon)
    return {seed: r for (m, e, seed), r in results.grid.items() if m == method and e == eps}


def _values(rows: Iterable[Row], key: str) -> list[float]:
    """The finite values of ``key`` in ``rows`` (absent, None and NaN left out)."""
    out = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and not math.isnan(value):
            out.append(float(value))
    return out


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def mean_sd(values: list[float], spec: str = ".3f") -> str:
    """Mean ± sd over seeds; a lone value bare (the tables count the seeds)."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:{spec}}"
    return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):{spec}}"


# ------------------------------------------------------------------------------------------------ gap closed
def base_perplexity(results: Results) -> float | None:
    row = by_seed(results, "pretrained", None).get(None)
    return None if row is None else float(row["test_perplexity_after"])


def nonprivate_perplexities(results: Results) -> dict[int, float]:
    return {
        seed: float(r["test_perplexity_after"])
        for seed, r in by_seed(results, "nonprivate", None).items()
        if seed is not None
    }


def gap_closed_by_seed(
    rows: dict[int | None, Row], base: float | None, nonprivate: dict[int, float]
) -> dict[int | None, float]:
    """Each seed's share of the base → non-private log-perplexity gap: against the same seed's non-private cell
    where it exists (the seed's data order and noise are shared), else against the mean over seeds."""
    mean = statistics.mean(nonprivate.values()) if nonprivate else None
    out: dict[int | None, float] = {}
    for seed, row in rows.items():
        reference = nonprivate.get(seed, mean) if seed is not None else mean
        gap = sweep.gap_closed(float(row["test_perplexity_after"]), base, reference)
        if gap is not None:
            out[seed] = gap
    return out


# ------------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    name: str
    epsilon: float
    figures: str
    status: str  # met / not met / not yet run / not measured


def paired(
    results: Results, epsilon: float, a: str = "rldp", b: str = "dpsgd_flat"
) -> list[tuple[int, Row, Row]]:
    """(seed, row of a, row of b) for every seed where both cells ran at ε."""
    rows_a, rows_b = by_seed(results, a, epsilon), by_seed(results, b, epsilon)
    seeds = sorted(s for s in rows_a.keys() & rows_b.keys() if s is not None)  # private cells all have a seed
    return [(s, rows_a[s], rows_b[s]) for s in seeds]


def perplexity_target(results: Results, epsilon: float) -> Target:
    name = "(a) RLDP's test perplexity below DP-SGD flat's (mean relative difference < 0)"
    pairs = paired(results, epsilon)
    if not pairs:
        return Target(name, epsilon, "–", NOT_YET)
    relative = {
        s: (a["test_perplexity_after"] - b["test_perplexity_after"]) / b["test_perplexity_after"]
        for s, a, b in pairs
    }
    mean = statistics.mean(relative.values())
    seeds = ", ".join(f"s{s} {v:+.2%}" for s, v in relative.items())
    figures = f"mean {mean:+.2%} over {_seeds_label(len(pairs))} ({seeds})"
    interval = decide.paired_difference(relative, dict.fromkeys(relative, 0.0))
    if interval.low is not None and interval.high is not None:
        figures += f"; paired 95 % t-interval [{interval.low:+.2%}, {interval.high:+.2%}]"
    return Target(name, epsilon, figures, "met" if mean < 0 else "not met")


def steps_to_reach(curve: list[list[float]], target: float) -> float | None:
    """The first step at which ``curve`` ([[step, ppl], ...]) is ≤ ``target``, linearly interpolated between the
    validation before the crossing and the one at it; None when the curve never gets there."""
    previous: tuple[float, float] | None = None
    for step, ppl in curve:
        if ppl <= target:
            if previous is None:
                return float(step)
            step0, ppl0 = previous
            return step0 + (ppl0 - target) / (ppl0 - ppl) * (step - step0)
        previous = (float(step), float(ppl))
    return None


def reach_fraction(row: Row, reference: Row) -> float | None:
    """Steps ``row`` needed to reach ``reference``'s final validation perplexity, as a share of its steps."""
    curve, ref_curve = row.get("val_curve") or [], reference.get("val_curve") or []
    if not curve or not ref_curve or not reference.get("steps"):
        return None
    step = steps_to_reach(curve, ref_curve[-1][1])
    return None if step is None else step / reference["steps"]


def speed_target(results: Results, epsilon: float) -> Target:
    name = (
        f"(b) RLDP reaches DP-SGD flat's final validation perplexity within {STEPS_TARGET:.0%} of its steps "
        "(interpolated between validations)"
    )
    pairs = paired(results, epsilon)
    if not pairs:
        return Target(name, epsilon, "–", NOT_YET)
    fractions = {s: reach_fraction(a, b) for s, a, b in pairs}
    seeds = ", ".join(
        f"s{s} " + ("never reached" if f is None else f"{f:.0%} (step {f * b['steps']:.1f} of {b['steps']})")
        for (s, _, b), f in zip(pairs, fractions.values(), strict=True)
    )
    reached = [f for f in fractions.values() if f is not None]
    if len(reached) < len(fractions):
        return Target(name, epsilon, f"{seeds}: not reached in every seed", "not met")
    mean = statistics.mean(reached)
    figures = f"mean {mean:.0%} of DP-SGD's steps over {_seeds_label(len(pairs))} ({seeds})"
    return Target(name, epsilon, figures, "met" if mean <= STEPS_TARGET else "not met")


def auc_target(results: Results, epsilon: float) -> Target:
    name = f"(c) RLDP's MIA loss AUC no worse than DP-SGD flat's (mean difference ≤ {SE_FACTOR:g} × its SE)"
    pairs = [(s, a, b) for s, a, b in paired(results, epsilon) if _has(a, b, "mia_auc", "mia_auc_se")]
    if not pairs:
        return Target(name, epsilon, "–", NOT_YET if not paired(results, epsilon) else "not measured")
    diffs = {s: a["mia_auc"] - b["mia_auc"] for s, a, b in pairs}
    mean = statistics.mean(diffs.values())
    # Both cells of a seed score the same members and non-members, so their AUCs are correlated and treating the
    # two SEs as independent would overstate the difference's SE (a lenient test). With ≥ 2 seeds: the SE of the
    # paired differences' mean over seeds (training-seed variation included); with one: one cell's SE.
    if len(diffs) >= 2:
        se, how = statistics.stdev(diffs.values()) / math.sqrt(len(diffs)), "over seeds"
    else:
        se, how = max(a["mia_auc_se"] for _, a, _ in pairs), "one cell's Hanley–McNeil SE"
    seeds = ", ".join(f"s{s} {d:+.3f}" for s, d in diffs.items())
    figures = f"mean difference {mean:+.3f} ({seeds}); {SE_FACTOR:g} × SE = {SE_FACTOR * se:.3f} ({how})"
    return Target(name, epsilon, figures, "met" if mean <= SE_FACTOR * se else "not met")


def exposure_target(results: Results, epsilon: float) -> Target:
    name = (
        "(c) RLDP's canary exposure (inserted once) no worse than DP-SGD flat's (mean difference ≤ "
        "max(0, sd of the never-inserted canaries' exposure over these cells))"
    )
    keys = ("canary_exposure", "canary_exposure_not_inserted")
    pairs = [(s, a, b) for s, a, b in paired(results, epsilon) if _has(a, b, *keys)]
    if not pairs:
        return Target(name, epsilon, "–", NOT_YET if not paired(results, epsilon) else "not measured")
    diffs = {s: a["canary_exposure"] - b["canary_exposure"] for s, a, b in pairs}
    mean = statistics.mean(diffs.values())
    chance = _values([r for _, a, b in pairs for r in (a, b)], "canary_exposure_not_inserted")
    spread = statistics.stdev(chance) if len(chance) > 1 else 0.0
    seeds = ", ".join(f"s{s} {d:+.2f}" for s, d in diffs.items())
    figures = f"mean difference {mean:+.2f} bits ({seeds}); never-inserted spread {spread:.2f} bits"
    return Target(name, epsilon, figures, "met" if mean <= max(0.0, spread) else "not met")


def _has(a: Row, b: Row, *keys: str) -> bool:
    return all(isinstance(r.get(k), int | float) for r in (a, b) for k in keys)


DOWNSTREAM = "proxy only: the target itself is judged in the downstream block (T = 128) below"


def dpzo_targets(results: Results, epsilon: float, methods: list[str]) -> list[Target]:
    """DP-ZO's downstream targets (of the DP-ZO methods in ``methods``) are not measured here; the gap closed on
    test perplexity stands in."""
    base, nonprivate = base_perplexity(results), nonprivate_perplexities(results)

    def gap(method: str) -> str:
        rows = by_seed(results, method, epsilon)
        values = list(gap_closed_by_seed(rows, base, nonprivate).values())
        return f"{mean_sd(values, '.1%')} ({_seeds_label(len(values))})" if values else NOT_YET

    gaussian = (
        f"proxy, gap closed on test perplexity: DP-ZO Gaussian {gap('dpzo_gaussian')} "
        f"vs DP-SGD flat {gap('dpsgd_flat')}"
    )
    laplace = (
        f"proxy: DP-ZO Laplace gap closed {gap('dpzo_laplace')} "
        "(> 0: better than the base model on test perplexity)"
    )
    found = {
        "dpzo_gaussian": Target("(d) DP-ZO Gaussian's downstream accuracy", epsilon, gaussian, DOWNSTREAM),
        "dpzo_laplace": Target(
            "(d) DP-ZO Laplace above the base model on the downstream task", epsilon, laplace, DOWNSTREAM
        ),
    }
    return [t for m, t in found.items() if m in methods]


def _seeds_label(n: int) -> str:
    return "1 seed" if n == 1 else f"{n} seeds"


# ------------------------------------------------------------------------------------------------ audit power
def finds_members(auc: float, se: float) -> bool:
    """The attack separates members from non-members: AUC more than two SEs above chance."""
    return auc - SE_FACTOR * se > 0.5


def audit_power_verdict(row: Row | None) -> str:
    if row is None:
        return "the control (`control_memorise_s0`) has not run yet: the audits' power is unknown."
    auc, se = row.get("mia_auc"), row.get("mia_auc_se")
    if auc is None or se is None:
        return "the control ran without the membership-inference audit: its power is unknown."
    if finds_members(auc, se):
        return f"the attack finds the control's members: AUC {auc:.3f} ± {se:.3f}."
    return (
        f"the audit has no power at this size: the control's AUC {auc:.3f} ± {se:.3f} is within "
        f"{SE_FACTOR:g} SE of 0.5, so a low AUC in the grid says nothing about privacy."
    )


def audit_power_section(results: Results) -> list[str]:
    row = next((r for r in results.cells.values() if r["settings"]["role"] == "control"), None)
    lines = ["## Audit power", ""]
    if row is not None:
        lines += [
            f"Control `{row['cell']}`: non-private LoRA, {row['steps']} steps on a small training set (it "
            f"memorises), {format_or_dash(row.get('mia_members'), '.0f')} members scored against as many non-members.",
            "",
            "| MIA loss AUC ± SE | reference AUC ± SE | TPR@1%FPR loss / reference | canary exposure 8× "
            "| not inserted | once |",
            "| --- | --- | --- | ---: | ---: | ---: |",
            f"| {_auc(row, 'mia_auc')} | {_auc(row, 'mia_reference_auc')} | {_tpr([row])} "
            + "".join(
                f"| {format_or_dash(row.get(k), '.2f')} "
                for k in ("canary_exposure_r8", "canary_exposure_not_inserted", "canary_exposure")
            )
            + "|",
            "",
        ]
    rule = f"(rule: the attack finds the members when AUC − {SE_FACTOR:g} SE > 0.5)"
    return [*lines, f"Verdict: {audit_power_verdict(row)} {rule}", ""]


def _tpr(rows: list[Row]) -> str:
    """Mean TPR at 1 % FPR of the loss and the reference attacks."""
    loss = _mean(_values(rows, "mia_tpr_at_1pct_fpr"))
    reference = _mean(_values(rows, "mia_reference_tpr_at_1pct_fpr"))
    return f"{format_or_dash(loss, '.3f')} / {format_or_dash(reference, '.3f')}"


def _auc(row: Row, key: str) -> str:
    auc, se = row.get(key), row.get(f"{key}_se")
    if auc is None:
        return "–"
    return f"{auc:.3f}" + ("" if se is None else f" ± {se:.3f}")


# ------------------------------------------------------------------------------------------------ tuning
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def is_chosen(method: str, settings: dict[str, Any], tuned: dict[str, Any]) -> bool:
    """Whether a tuning cell's settings are the ones the plan chose for ``method``."""
    choice = tuned.get(method)
    if not choice or choice.get("fallback"):
        return False
    return all(_same(_setting(settings, k), _setting(choice, k)) for k in ("lr", "schedule", "mu"))


def _setting(settings: dict[str, Any], key: str) -> Any:
    return settings.get(key, "constant" if key == "schedule" else None)  # no schedule: a constant rate


def decide_dir(plan: dict[str, Any]) -> Path:
    path = Path(plan["decide_out"])
    return path if path.is_absolute() else ROOT / path


def dpsgd_tuning_rows(plan: dict[str, Any]) -> list[Row]:
    """dpsgd_flat's public tuning cells: rldp_decide.py's plain SGD runs on public notes at the tuning ε."""
    if not plan.get("decide_out"):
        return []
    rows = sweep.load_rows(decide_dir(plan) / sweep.JSONL)
    newest = {r["cell"]: r for r in rows if r["status"] == "ok"}
    return [
        r
        for r in newest.values()
        if not r["settings"].get("role")  # the matrix's own timing cells share the filter below
        and r["settings"].get("data_seed") == matrix.PUBLIC_DATA_SEED
        and r["settings"].get("kind") == "dpsgd"
        and r["settings"].get("optimizer") == "sgd"
        and not r["settings"].get("controller")
        and r["settings"].get("epsilon") is not None
        and math.isclose(r["settings"]["epsilon"], matrix.TUNING_EPSILON)
    ]


def tuning_rows(results: Results, plan: dict[str, Any]) -> dict[str, list[Row]]:
    """method -> its tuning cells, in run_matrix.METHODS order."""
    out: dict[str, list[Row]] = {"dpsgd_flat": dpsgd_tuning_rows(plan)}
    for row in results.cells.values():
        if row["settings"]["role"] == "tune":
            out.setdefault(row["settings"]["method"], []).append(row)
    return {m: out[m] for m in matrix.METHODS if out.get(m)}


def tuning_section(results: Results, plan: dict[str, Any]) -> list[str]:
    tuned = plan.get("tuned", {})
    lines = [
        "## Tuning (public notes, seed 0)",
        "",
        "Each method's settings are chosen on the public validation perplexity (data_seed "
        f"{matrix.PUBLIC_DATA_SEED}, ε = {matrix.TUNING_EPSILON:g} for the private ones); ✓ marks the plan's choice.",
        "",
        "| method | cell | lr | schedule | μ | steps | public val ppl | ε spent | chosen |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    found = tuning_rows(results, plan)
    if not found:
        lines[-2:] = ["No tuning cell has finished yet."]
    for method, rows in found.items():
        for row in rows:
            s = row["settings"]
            lines.append(
                f"| {method} | {row['cell']} | {format_or_dash(s.get('lr'), 'g')} | {s.get('schedule', 'constant')} "
                f"| {format_or_dash(s.get('mu'), 'g')} | {row['steps']} | {format_or_dash(row.get('val_perplexity_after'), '.3f')} "
                f"| {format_or_dash(row.get('epsilon_spent'), '.3f')} | {'✓' if is_chosen(method, s, tuned) else ''} |"
            )
    return [*lines, "", *_tuning_notes(plan), ""]


def _tuning_notes(plan: dict[str, Any]) -> list[str]:
    tuned, notes = plan.get("tuned", {}), []
    flat = tuned.get("dpsgd_flat")
    if flat is not None and flat.get("fallback"):
        notes.append(
            f"- dpsgd_flat: its public tuning cells (in `{plan.get('decide_out')}`) are missing or incomplete, so "
            f"the recipe's point lr {flat['lr']:g} {flat.get('schedule', 'constant')} stands in for their choice."
        )
    rldp = tuned.get("rldp")
    if rldp is not None:
        notes.append(
            f"- rldp: not tuned; it starts from the recipe's point lr {rldp['lr']:g} "
            f"{rldp.get('schedule', 'constant')} and its controller moves the clip norm (the step size under SGD)."
        )
    waiting = [m for m in plan.get("methods", []) if m not in tuned]
    if waiting:
        notes.append(f"- not tuned yet (their grid cells wait): {', '.join(waiting)}.")
    return notes


# ------------------------------------------------------------------------------------------------ per ε
def report_epsilons(plan: dict[str, Any], results: Results) -> list[tuple[float, str]]:
    """(ε, note): the plan's, its low ε, then any ε with grid rows that the plan no longer asks for."""
    out = [(float(e), "") for e in plan.get("epsilons", [])]
    if plan.get("low_epsilon") is not None:
        out.append((float(plan["low_epsilon"]), f"low ε: {', '.join(matrix.LOW_EPSILON_METHODS)} only"))
    planned = {_eps(e) for e, _ in out}
    extra = sorted({e for (_, e, _) in results.grid if e is not None and e not in planned}, reverse=True)
    return out + [(e, "not in the current plan: rows of an earlier invocation") for e in extra]


def methods_at(epsilon: float, plan: dict[str, Any], results: Results) -> list[str]:
    """The references and the private methods planned at ε (and any with rows there), in METHODS order."""
    planned = set(plan.get("methods") or matrix.METHODS)
    if _eps(epsilon) == _eps(plan.get("low_epsilon")):
        planned &= {*REFERENCES, *matrix.LOW_EPSILON_METHODS}
    elif not any(_eps(epsilon) == _eps(e) for e in plan.get("epsilons", [])):
        planned &= set(REFERENCES)
    present = {m for (m, e, _) in results.grid if e == _eps(epsilon)}
    return [m for m in matrix.METHODS if m in REFERENCES or m in planned or m in present]


def _sigma_over_batch(row: Row) -> float | None:
    """σ/B; a controller's mean σ over its steps when σ moved."""
    moved, batch = row.get("sigma_steps"), row["settings"].get("expected_batch")
    if moved and batch:
        return moved["mean"] / batch
    return row.get("sigma_over_batch")


def train_seconds(row: Row) -> float | None:
    """Seconds spent in training batches (forward, backward, clipping, noise, optimizer step), when the cell
    recorded them; else the fit wall-clock, which also holds the validations and the end-of-fit audits."""
    return row.get("train_s") or row.get("fit_wall_s")


def examples_per_s(row: Row) -> float | None:
    """Training examples per second of training time (:func:`train_seconds`)."""
    batch, wall = row["settings"].get("expected_batch"), train_seconds(row)
    if not row.get("steps") or not batch or not wall:
        return None
    return row["steps"] * batch / wall


def _seeds_done(method: str, rows: dict[int | None, Row], plan: dict[str, Any]) -> str:
    if method == "pretrained":
        return f"{len(rows)} (no seed)"
    return f"{len(rows)}/{len(plan.get('seeds') or matrix.SEEDS)}"


def _epsilon_spent(rows: list[Row], epsilon: float) -> str:
    spent = _values(rows, "epsilon_spent")
    if not spent:
        return "–"
    over = max(spent) > epsilon * (1 + 1e-9)
    return f"{max(spent):.3f}" + (" (> target!)" if over else "")


def _seconds(value: float | None) -> str:
    return format_or_dash(value, ".0f" if value is not None and value >= 100 else ".1f")


def utility_row(method: str, epsilon: float, results: Results, plan: dict[str, Any]) -> str:
    rows = by_seed(results, method, epsilon)
    cells = list(rows.values())
    if not cells:
        return f"| {method} | {_seeds_done(method, rows, plan)} | {NOT_YET} |" + " – |" * 7
    gaps = gap_closed_by_seed(rows, base_perplexity(results), nonprivate_perplexities(results))
    private = method not in REFERENCES
    sigma_b = [v for r in cells if (v := _sigma_over_batch(r)) is not None]
    speed = [v for r in cells if (v := examples_per_s(r)) is not None]
    walls = _values(cells, "fit_wall_s")
    rss = _values(cells, "peak_rss_mb")
    return (
        f"| {method} | {_seeds_done(method, rows, plan)} | {mean_sd(_values(cells, 'test_perplexity_after'))} "
        f"| {mean_sd(list(gaps.values()), '.1%')} | {', '.join(sorted({str(r['steps']) for r in cells}))} "
        f"| {format_or_dash(_mean(sigma_b), '.4f')} | {_epsilon_spent(cells, epsilon) if private else '–'} "
        f"| {_seconds(statistics.median(walls) if walls else None)} "
        f"| {format_or_dash(statistics.median(speed) if speed else None, '.1f')} | {format_or_dash(max(rss, default=None), '.0f')} |"
    )


def audit_row(method: str, epsilon: float, results: Results) -> str:
    cells = list(by_seed(results, method, epsilon).values())
    auc, se = _values(cells, "mia_auc"), _values(cells, "mia_auc_se")
    ref, ref_se = _values(cells, "mia_reference_auc"), _values(cells, "mia_reference_auc_se")
    mia, reference = _mean_auc(auc, se), _mean_auc(ref, ref_se)
    tpr = _tpr(cells)
    exposure = " / ".join(
        format_or_dash(_mean(_values(cells, k)), ".2f")
        for k in ("canary_exposure", "canary_exposure_r8", "canary_exposure_not_inserted")
    )
    bound = format_or_dash(max(_values(cells, "empirical_epsilon_lower_bound"), default=None), ".3f")
    return f"| {method} | {mia} | {reference} | {tpr} | {exposure} | {bound} |"


def _mean_auc(auc: list[float], se: list[float]) -> str:
    """Mean AUC over seeds ± the mean of their SEs (the uncertainty of one seed's figure)."""
    if not auc:
        return "–"
    return f"{statistics.mean(auc):.3f}" + (f" ± {statistics.mean(se):.3f}" if se else "")


def epsilon_section(epsilon: float, note: str, results: Results, plan: dict[str, Any]) -> list[str]:
    methods = methods_at(epsilon, plan, results)
    return [
        f"## ε = {epsilon:g}" + (f" ({note})" if note else ""),
        "",
        "Utility and cost (pretrained and nonprivate: the same cells in every ε table; fit s and examples/s: "
        "the median over seeds, fit wall-clock including the validations and the end-of-fit audits):",
        "",
        "| method | seeds | test ppl (mean ± sd) | gap closed | steps | σ/B | max ε spent | fit s | examples/s "
        "| peak RSS MiB |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[utility_row(m, epsilon, results, plan) for m in methods],
        "",
        "σ/B: the noise multiplier over the expected batch (RLDP: its mean σ over the steps). DP-SGD's noise is on "
        "every coordinate of the clipped gradient sum, DP-ZO's on one clipped loss difference per step (Laplace: "
        "its scale λ), so σ/B compares within a family, not across.",
        "",
        "Audits (means over seeds; ± the mean Hanley–McNeil SE; exposure in bits; the ε lower bound: the "
        "largest over seeds, one-run audit from the once-inserted canaries):",
        "",
        "| method | MIA loss AUC | reference-attack AUC | TPR@1%FPR loss / reference "
        "| canary exposure once / 8× / not inserted | max ε lower bound |",
        "| --- | --- | --- | --- | --- | ---: |",
        *[audit_row(m, epsilon, results) for m in methods],
        "",
    ]


TARGET_HEADER = ("| ε | target | figures | status |", "| ---: | --- | --- | --- |")


def target_lines(targets: Iterable[Target]) -> list[str]:
    """One table row per target, under :data:`TARGET_HEADER`."""
    return [f"| {t.epsilon:g} | {t.name} | {t.figures} | {t.status} |" for t in targets]


# ------------------------------------------------------------------------------------------------ downstream
DOWNSTREAM_GAP = 0.05  # DP-ZO Gaussian within 5 accuracy points of DP-SGD


def downstream_by_method(results: Results) -> dict[str, dict[int | None, Row]]:
    """method -> seed -> row of the downstream block."""
    found: dict[str, dict[int | None, Row]] = {}
    for row in results.cells.values():
        s = row["settings"]
        if s.get("role") == "downstream" and row.get("downstream_accuracy") is not None:
            found.setdefault(s["method"], {})[s.get("seed")] = row
    return found


def zo_vs_dpsgd_target(rows: dict[str, dict[int | None, Row]]) -> Target:
    name = (
        f"DP-ZO Gaussian's downstream accuracy ≥ DP-SGD flat's − {DOWNSTREAM_GAP:.0%} points (paired by seed)"
    )
    zo, sgd = rows.get("dpzo_gaussian", {}), rows.get("dpsgd_flat", {})
    seeds = sorted(s for s in zo.keys() & sgd.keys() if s is not None)
    if not seeds:
        return Target(name, matrix.DOWNSTREAM_EPSILON, NOT_YET, NOT_YET)
    diffs = [zo[s]["downstream_accuracy"] - sgd[s]["downstream_accuracy"] for s in seeds]
    per_seed = ", ".join(f"s{s} {d:+.1%}" for s, d in zip(seeds, diffs, strict=True))
    mean = statistics.fmean(diffs)
    figures = f"mean difference {mean:+.1%} over {_seeds_label(len(seeds))} ({per_seed})"
    return Target(name, matrix.DOWNSTREAM_EPSILON, figures, "met" if mean >= -DOWNSTREAM_GAP else "not met")


def laplace_above_base_target(rows: dict[str, dict[int | None, Row]], notes: int | None) -> Target:
    """Clearly above: the mean accuracy exceeds the base model's by more than 2 binomial standard errors of the
    base's accuracy on the scored notes."""
    name = "DP-ZO Laplace (pure ε) clearly above the base model on the downstream task (by > 2 SE)"
    base = next(iter(rows.get("pretrained", {}).values()), None)
    laplace = [r["downstream_accuracy"] for r in rows.get("dpzo_laplace", {}).values()]
    if base is None or not laplace or not notes:
        return Target(name, matrix.DOWNSTREAM_EPSILON, NOT_YET, NOT_YET)
    p = base["downstream_accuracy"]
    se = math.sqrt(max(p * (1 - p), 1e-12) / notes)
    mean = statistics.fmean(laplace)
    figures = (
        f"DP-ZO Laplace {mean_sd(laplace, '.1%')} ({_seeds_label(len(laplace))}) vs base {p:.1%} "
        f"(SE {se:.1%} on {notes} notes)"
    )
    return Target(name, matrix.DOWNSTREAM_EPSILON, figures, "met" if mean - p > SE_FACTOR * se else "not met")


def downstream_section(results: Results, plan: dict[str, Any]) -> list[str]:
    """The downstream block's table and DP-ZO's two downstream targets (nothing when no block cell has run)."""
    rows = downstream_by_method(results)
    if not rows:
        return []
    block = plan.get("downstream") or {}
    task = block.get("task") or next(iter(next(iter(rows.values())).values()))["task"]
    timing = block.get("timing")
    lines = [
        "## Downstream block: field extraction",
        "",
        f"T = {task['max_length']}, expected batch {task['batch_size'] * task.get('accumulate', 1)}, "
        f"{task['steps']} DP-SGD steps, the answer line in every training note; accuracy of greedy extraction "
        f"on {task.get('downstream_notes')} held-out test notes; ε = {matrix.DOWNSTREAM_EPSILON:g}. "
        + (
            f"DP-ZO: {timing['zo_steps']} steps (timed at this size: ratio {timing['ratio']:.3f})."
            if timing
            else "DP-ZO: not timed yet."
        ),
        "",
        "| method | seeds | downstream accuracy | majority class | test ppl | steps | max ε spent |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: |",
    ]
    for method in matrix.DOWNSTREAM_METHODS:
        cells = list(rows.get(method, {}).values())
        if not cells:
            lines.append(f"| {method} | 0 | {NOT_YET} | – | – | – | – |")
            continue
        spent = _values(cells, "epsilon_spent")
        lines.append(
            f"| {method} | {len(cells)} | {mean_sd(_values(cells, 'downstream_accuracy'), '.1%')} "
            f"| {format_or_dash(_mean(_values(cells, 'downstream_majority_rate')), '.1%')} "
            f"| {mean_sd(_values(cells, 'test_perplexity_after'))} | {cells[0]['steps']} "
            f"| {format_or_dash(max(spent) if spent else None, '.3f')} |"
        )
    targets = [zo_vs_dpsgd_target(rows), laplace_above_base_target(rows, task.get("downstream_notes"))]
    lines += ["", *TARGET_HEADER, *target_lines(targets)]
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------ summaries
def targets_section(results: Results, plan: dict[str, Any], epsilons: list[tuple[float, str]]) -> list[str]:
    lines = [
        "## Targets",
        "",
        "Paired by seed (both cells of a seed finished); figures are RLDP − DP-SGD flat unless named.",
        "",
        *TARGET_HEADER,
    ]
    for epsilon, _ in epsilons:
        found = [
            perplexity_target(results, epsilon),
            speed_target(results, epsilon),
            auc_target(results, epsilon),
            exposure_target(results, epsilon),
        ]
        found += dpzo_targets(results, epsilon, methods_at(epsilon, plan, results))
        lines += target_lines(found)
    return [*lines, ""]


def ranking(results: Results, epsilon: float, methods: list[str]) -> list[tuple[str, float, int]]:
    """(method, mean test perplexity, seeds) of the private methods with cells at ε, best first."""
    ranked = []
    for method in methods:
        if method in REFERENCES:
            continue
        values = _values(by_seed(results, method, epsilon).values(), "test_perplexity_after")
        if values:
            ranked.append((method, statistics.mean(values), len(values)))
    return sorted(ranked, key=lambda item: item[1])


def choice_section(results: Results, plan: dict[str, Any], epsilons: list[tuple[float, str]]) -> list[str]:
    lines = [
        "## Which method at which ε",
        "",
        "Private methods ranked by mean test perplexity (lower is better; seeds in brackets).",
        "",
        "| ε | ranking | best | note |",
        "| ---: | --- | --- | --- |",
    ]
    for epsilon, _ in epsilons:
        ranked = ranking(results, epsilon, methods_at(epsilon, plan, results))
        if not ranked:
            lines.append(f"| {epsilon:g} | {NOT_YET} | – | – |")
            continue
        order = " < ".join(f"{m} {ppl:.3f} ({n})" for m, ppl, n in ranked)
        few = [m for m, _, n in ranked if n < MIN_SEEDS]
        note = f"fewer than {MIN_SEEDS} seeds ({', '.join(few)}): provisional" if few else ""
        lines.append(f"| {epsilon:g} | {order} | {ranked[0][0]} | {note} |")
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------ plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_perplexity_vs_epsilon(out: Path, results: Results, epsilons: list[float]) -> Path | None:
    """Test perplexity (mean ± sd over seeds) against ε per private method; the references as lines."""
    series = {}
    for method in matrix.PRIVATE:
        points = [
            (e, _values(by_seed(results, method, e).values(), "test_perplexity_after")) for e in epsilons
        ]
        points = [(e, v) for e, v in points if v]
        if points:
            series[method] = points
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, points in series.items():
        xs = [e for e, _ in points]
        ys = [statistics.mean(v) for _, v in points]
        errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=_color(method), label=method)
    for method, style in zip(REFERENCES, (":", "--"), strict=True):
        values = _values(by_seed(results, method, None).values(), "test_perplexity_after")
        if values:
            ax.axhline(statistics.mean(values), color="k", ls=style, lw=1, label=method)
    ax.set_xscale("log")
    ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    ax.minorticks_off()
    ax.set_xlabel("target ε")
    ax.set_ylabel("test perplexity (mean ± sd over seeds)")
    ax.set_title("Test perplexity vs ε", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out / "test_perplexity_vs_epsilon.png")


def _log_y(ax: Any) -> None:
    """A log axis labelled in plain numbers: the curves span 2 orders of magnitude at full size, a few % in a
    quick run (where only the minor ticks fall inside)."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _color(method: str) -> str:
    """One colour per method across the figures."""
    return f"C{matrix.METHODS.index(method) % 10}"


def _curve(row: Row, wall_clock: bool) -> tuple[list[float], list[float]]:
    """A cell's validation curve over optimizer steps, or over training seconds (step × train_seconds / steps)."""
    steps = [float(s) for s, _ in row["val_curve"]]
    if wall_clock:
        per_step = (train_seconds(row) or 0.0) / row["steps"]
        steps = [s * per_step for s in steps]
    return steps, [float(p) for _, p in row["val_curve"]]


def plot_validation_curves(
    out: Path, results: Results, plan: dict[str, Any], epsilons: list[float], seed: int, wall_clock: bool
) -> Path | None:
    """Validation perplexity of every method at each ε (one panel per ε), seed ``seed``; the base model (no
    training: one validation) as a line."""
    panels = []
    for epsilon in epsilons:
        rows = {}
        for method in methods_at(epsilon, plan, results):
            row = by_seed(results, method, epsilon).get(None if method == "pretrained" else seed)
            if row is not None and row.get("val_curve"):
                rows[method] = row
        if any(m != "pretrained" for m in rows):
            panels.append((epsilon, rows))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (epsilon, rows) in zip(axes[0], panels, strict=True):
        for method, row in rows.items():
            if method == "pretrained" or not row.get("steps"):
                ax.axhline(row["val_curve"][0][1], color="k", ls=":", lw=1, label=method)
                continue
            ax.plot(*_curve(row, wall_clock), marker=".", color=_color(method), label=method)
        ax.set_title(f"ε = {epsilon:g}, seed {seed}", fontsize=9)
        ax.set_xlabel("fit seconds (step × fit_wall_s / steps)" if wall_clock else "optimizer step")
        ax.set_ylabel("validation perplexity")
        _log_y(ax)
        ax.legend(fontsize=7)
    name = "validation_vs_wallclock.png" if wall_clock else "validation_vs_step.png"
    return _save(fig, out / name)


def plot_rldp_controls(
    out: Path, results: Results, epsilon: float, seed: int, plan: dict[str, Any]
) -> Path | None:
    """RLDP's σ and clip norm per step beside DP-SGD flat's constants at ε, from the cells' TensorBoard tags (or
    their copies under ``<out>/trajectories``); the PNG an earlier report drew when the logs are gone."""
    path = out / f"trajectories_eps{epsilon:g}_s{seed}.png"
    controller = plan.get("tuned", {}).get("rldp", {}).get("controller", "rldp")
    drawn = []
    for method, label in (("dpsgd_flat", "DP-SGD flat"), ("rldp", CONTROLLERS.get(controller, controller))):
        row = by_seed(results, method, epsilon).get(seed)
        scalars = None if row is None else trajectories.cell_scalars(out, row["cell"])
        if row is None or scalars is None:
            continue
        try:
            drawn.append(
                (method, trajectories.trajectory(label, row["settings"], scalars, int(row["steps"])))
            )
        except (ValueError, KeyError):  # a cell without the privacy tags or its lr: nothing to draw for it
            continue
    if not any(method == "rldp" for method, _ in drawn):
        return path if path.is_file() else None
    title = f"ε = {epsilon:g}, seed {seed}: RLDP's controls against DP-SGD flat's constants"
    return trajectories.plot_trajectories([t for _, t in drawn], title, path)


def plots_section(out: Path, results: Results, plan: dict[str, Any], epsilons: list[float]) -> list[str]:
    seed = min(plan.get("seeds") or [0])
    figures = [
        ("Test perplexity vs ε", plot_perplexity_vs_epsilon(out, results, epsilons)),
        (
            f"Validation perplexity vs step (seed {seed})",
            plot_validation_curves(out, results, plan, epsilons, seed, False),
        ),
        (
            f"Validation perplexity vs fit wall-clock (seed {seed})",
            plot_validation_curves(out, results, plan, epsilons, seed, True),
        ),
    ]
    figures += [
        (f"RLDP's σ and clip norm, ε = {e:g}, seed {seed}", plot_rldp_controls(out, results, e, seed, plan))
        for e in epsilons
    ]
    drawn = [f"![{title}]({path.name})" for title, path in figures if path is not None]
    if not drawn:
        return ["## Plots", "", "None yet: no grid cell with the figures they need.", ""]
    return ["## Plots", "", *[line for image in drawn for line in (image, "")]]


# ------------------------------------------------------------------------------------------------ header
def _delta(results: Results) -> str:
    deltas = sorted({d for d in _values(results.grid.values(), "delta") if d > 0})
    return ", ".join(f"{d:g}" for d in deltas) if deltas else "–"


def regime_line(results: Results) -> str:
    if not results.cells:
        return "Regime: no matrix cell has finished yet."
    grid = [r for r in results.cells.values() if not _downstream(r)]
    if not grid:
        return "Regime: no matrix cell of the main grid has finished yet."
    task = grid[-1]["task"]
    return (
        f"Regime: {task['model']}, N = {decide.train_size(task):,} training notes (of {task['num_records']:,} "
        f"pseudo-clinical records, data_seed {task.get('data_seed', 0)}), T = {task['max_length']}, expected "
        f"batch {task['batch_size'] * task['accumulate']} (Poisson), {task['steps']} DP-SGD steps, "
        f"{task['precision']}, δ = {_delta(results)} (DP-ZO Laplace: pure ε)."
    )


def calibration_line(plan: dict[str, Any]) -> str:
    timing = plan.get("timing")
    if not timing:
        return "DP-ZO's steps: not calibrated yet (its timing cells have not all run; its cells wait)."
    sgd = ", ".join(f"{t:.3f}" for t in timing["dpsgd_batch_s"])
    zo = ", ".join(f"{t:.3f}" for t in timing["dpzo_batch_s"])
    return (
        f"DP-ZO's steps: {timing['zo_steps']} = round({timing['dpsgd_steps']} × {timing['ratio']:.3f}), the "
        f"median over {_rounds(len(timing['dpsgd_batch_s']))} of DP-SGD's / DP-ZO's median training batch "
        f"(DP-SGD {sgd} s, DP-ZO {zo} s per round); DP-SGD keeps {timing['dpsgd_steps']} steps. Equal "
        "wall-clock, from timing runs alone (one cell at a time), so both step counts are reported."
    )


def _rounds(n: int) -> str:
    return "1 round" if n == 1 else f"{n} alternating rounds"


def variant_lines(plan: dict[str, Any]) -> list[str]:
    tuned = plan.get("tuned", {})
    lines = []
    rldp = tuned.get("rldp")
    if rldp is not None:
        controller = rldp.get("controller", "rldp")
        prior = f" (`{plan['policy']}`)" if plan.get("policy") and controller == "rldp_prior" else ""
        lines.append(f"RLDP variant: {CONTROLLERS.get(controller, controller)}{prior}.")
    flat = tuned.get("dpsgd_flat")
    if flat is not None:
        point = f"lr {flat['lr']:g} {flat.get('schedule', 'constant')}"
        lines.append(
            f"DP-SGD flat: the public tuning cells were missing, so the recipe's point ({point}) is used."
            if flat.get("fallback")
            else f"DP-SGD flat: {point}, chosen on public notes."
        )
    return lines


def header(results: Results, plan: dict[str, Any]) -> list[str]:
    commands = list(dict.fromkeys(r["command"] for r in results.cells.values()))
    lines = [
        "# Which method at which ε",
        "",
        f"Generated by `.venv/bin/python benchmarks/report_matrix.py` (and after every cell of "
        f"`benchmarks/run_matrix.py`) from [{sweep.JSONL}]({sweep.JSONL}) and [{matrix.PLAN}]({matrix.PLAN}); do "
        "not edit by hand. Methods, grid and audits: the docstring of benchmarks/run_matrix.py.",
        "",
        regime_line(results),
        "",
        *[f"Command: `{c}`" for c in commands],
        "",
        calibration_line(plan),
        "",
        *[line for v in variant_lines(plan) for line in (v, "")],
        "Gap closed = (log ppl_base − log ppl) / (log ppl_base − log ppl_nonprivate) on test perplexity: base = "
        "the pretrained cell, non-private = the same seed's nonprivate cell (the mean over seeds where that seed has "
        "none).",
        "",
    ]
    if plan.get("quick"):
        lines += ["**--quick run**: tiny-llama, a few steps: checks the machinery only.", ""]
    if results.left_out:
        lines += [
            f"{results.left_out} finished cells of another regime (task) or of settings the plan no longer chooses "
            "are left out.",
            "",
        ]
    if results.failed:
        lines += ["Failed (rerun by the next invocation): " + ", ".join(results.failed), ""]
    return lines


# ------------------------------------------------------------------------------------------------ report
def nothing_yet(out: Path, results: Results) -> list[str]:
    lines = [
        "# Which method at which ε",
        "",
        f"Nothing has finished yet: no finished cell in `{sweep.JSONL}`"
        + ("" if (out / matrix.PLAN).exists() else f" and no `{matrix.PLAN}`")
        + ". Run `benchmarks/run_matrix.py`; this page is rewritten after every cell.",
        "",
    ]
    if results.failed:
        lines += ["Failed (rerun by the next invocation): " + ", ".join(results.failed), ""]
    return lines


def report(out: Path) -> Path:
    """Write ``<out>/README.md`` (and the PNGs beside it) from the JSONL and the plan; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    plan = load_plan(out)
    results = load_results(out, plan or {})
    if not results.cells:
        lines = nothing_yet(out, results)
    else:
        if plan is None:  # the tuning stage has not finished: what there is, in a default plan's terms
            plan = {
                "methods": list(matrix.METHODS),
                "epsilons": [],
                "low_epsilon": None,
                "tuned": {"pretrained": {}},
            }
        epsilons = report_epsilons(plan, results)
        lines = header(results, plan)
        if not (out / matrix.PLAN).exists():
            lines += [f"No `{matrix.PLAN}` yet: the tuning stage has not finished.", ""]
        lines += tuning_section(results, plan)
        for epsilon, note in epsilons:
            lines += epsilon_section(epsilon, note, results, plan)
        lines += targets_section(results, plan, epsilons)
        lines += downstream_section(results, plan)
        lines += audit_power_section(results)
        lines += choice_section(results, plan, epsilons)
        lines += plots_section(out, results, plan, [e for e, _ in epsilons])
    path = out / README
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=matrix.OUT, help="run_matrix.py's results directory")
    args = parser.parse_args(argv)
    print(report(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
