"""Turn ``matrix.jsonl`` (from ``run_matrix.py``) into ``README.md`` tables (mean ± std over seeds) and PNG plots.

Usage::

    .venv/bin/python benchmarks/report_matrix.py                       # benchmarks/results/matrix.jsonl
    .venv/bin/python benchmarks/report_matrix.py --results /tmp/m      # another results directory
    .venv/bin/python benchmarks/report_matrix.py --summary docs/benchmarks.md   # and its summary block

Only rows of one task (model, sizes, step budget) are compared: the task of the most recent ``ok`` row; rows of
other tasks are counted and left out. For each (method, ε, seed) the latest ``ok`` row is used.

*Steps to DP-SGD's final perplexity*: for a cell (method, ε, seed), the first validation step at which its held-out
perplexity is ≤ the final held-out perplexity of ``dpsgd_flat`` at the same ε and seed, as a fraction of that
DP-SGD run's steps ("—" when never reached within the budget).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from run_matrix import NO_EPSILON  # cells without a budget: shown in every ε column

from dplightning.checkpoint_io import atomic_write

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = "dpsgd_flat"
ORDER = (
    "pretrained",
    "nonprivate",
    "dpsgd_flat",
    "dpsgd_per_adapter",
    "quantile_clipping",
    "automatic_clipping",
    "noise_schedule",
    "rldp",
    "dpzo_gaussian",
    "dpzo_laplace",
    "lmo_dpzo",
    "lmo_dpsgd",
)

Key = tuple[str, float | None, int]


def load_rows(path: Path) -> tuple[dict[Key, dict[str, Any]], dict[str, Any], int]:
    """Latest ``ok`` row per (method, ε, seed) of the newest task; returns (rows, task, rows of other tasks)."""
    ok = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ok = [r for r in ok if r.get("status") == "ok"]
    if not ok:
        raise SystemExit(f"error: no finished cells in {path}; run benchmarks/run_matrix.py first")
    task = ok[-1]["task"]
    rows: dict[Key, dict[str, Any]] = {}
    for row in ok:
        if row["task"] == task:
            rows[(row["method"], row["epsilon"], row["seed"])] = row
    return rows, task, sum(r["task"] != task for r in ok)


def steps_to_reference(row: dict[str, Any], reference: dict[str, Any] | None) -> float | None:
    """Fraction of the reference run's steps this run needed to reach the reference's final val perplexity."""
    if reference is None or not reference.get("val_curve") or not row.get("val_curve"):
        return None
    target = reference["val_curve"][-1][1]
    for step, ppl in row["val_curve"]:
        if ppl <= target:
            return step / max(reference["steps"], 1)
    return None


def mean_std(values: Iterable[float | None], fmt: str = "{:.2f}") -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "—"
    if len(vals) == 1:
        return fmt.format(vals[0]) + " (n=1)"
    spread = fmt.replace("+", "").format(statistics.stdev(vals))  # a sign shows on the mean only
    return f"{fmt.format(statistics.fmean(vals))} ± {spread} (n={len(vals)})"


def _methods(rows: dict[Key, dict[str, Any]]) -> list[str]:
    present = {k[0] for k in rows}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def _epsilons(rows: dict[Key, dict[str, Any]]) -> list[float]:
    return sorted({k[1] for k in rows if k[1] is not None})


def _cells(rows: dict[Key, dict[str, Any]], method: str, eps: float | None) -> list[dict[str, Any]]:
    e = None if method in NO_EPSILON else eps
    return [r for (m, ep, _), r in sorted(rows.items(), key=lambda kv: kv[0][2]) if m == method and ep == e]


METRICS: tuple[tuple[str, str, str], ...] = (
    ("test_perplexity", "Test perplexity (lower is better)", "{:.3f}"),
    ("epsilon_spent", "ε spent (accountant)", "{:.3f}"),
    (
        "steps_to_reference",
        f"Steps to reach {REFERENCE}'s final val perplexity, fraction of its steps",
        "{:.2f}",
    ),
    ("wall_time_s", "Fit wall time including the end-of-fit audits, s", "{:.0f}"),
    ("peak_rss_mb", "Peak RSS of the cell process, MiB", "{:.0f}"),
    ("mia_auc", "Membership inference ROC AUC (loss attack)", "{:.3f}"),
    ("canary_exposure", "Canary exposure, bits", "{:.2f}"),
    ("canary_jaccard", "Canary extraction token Jaccard", "{:.3f}"),
    ("empirical_epsilon_lower_bound", "Empirical ε lower bound (one-run audit)", "{:.3f}"),
)


def metric_value(
    rows: dict[Key, dict[str, Any]], row: dict[str, Any], metric: str, eps: float
) -> float | None:
    """``metric`` of one cell shown in the ε=``eps`` column (the non-private row appears in every column)."""
    if metric == "steps_to_reference":
        return steps_to_reference(row, rows.get((REFERENCE, eps, row["seed"])))
    value = row.get(metric)
    return float(value) if isinstance(value, int | float) else None


def tables(rows: dict[Key, dict[str, Any]], metrics: tuple[tuple[str, str, str], ...] = METRICS) -> list[str]:
    methods, epsilons = _methods(rows), _epsilons(rows)
    lines: list[str] = []
    for metric, title, fmt in metrics:
        if all(metric_value(rows, r, metric, e) is None for r in rows.values() for e in epsilons):
            continue
        lines += [f"### {title}", "", "| method | " + " | ".join(f"ε={e:g}" for e in epsilons) + " |"]
        lines.append("|---" * (len(epsilons) + 1) + "|")
        for m in methods:
            cells = [
                mean_std((metric_value(rows, r, metric, e) for r in _cells(rows, m, e)), fmt)
                for e in epsilons
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def paired(
    rows: dict[Key, dict[str, Any]],
    method: str,
    other: str,
    eps: float,
    value: Callable[[dict[str, Any]], float | None],
    combine: Callable[[float, float], float] = lambda a, b: a - b,
) -> list[float]:
    """``combine(value(method cell), value(other cell))`` for every seed where both ran at ``eps`` (paired by seed)."""
    out = []
    for (m, e, seed), row in rows.items():
        ref = rows.get((other, eps, seed))
        if m == method and e == eps and ref is not None:
            a, b = value(row), value(ref)
            if a is not None and b is not None:
                out.append(combine(a, b))
    return out


def _relative(rows: dict[Key, dict[str, Any]], method: str, other: str, eps: float) -> list[float]:
    """Paired per-seed change of test perplexity of ``method`` relative to ``other``, in % of ``other``."""
    return paired(rows, method, other, eps, lambda r: r["test_perplexity"], lambda a, b: 100.0 * (a - b) / b)


def _base_gain(row: dict[str, Any]) -> float | None:
    """% change of held-out perplexity from the step-0 (base model) validation to the last one."""
    curve = row.get("val_curve") or []
    return 100.0 * (curve[-1][1] - curve[0][1]) / curve[0][1] if len(curve) > 1 else None


def targets(rows: dict[Key, dict[str, Any]]) -> list[str]:
    """The comparison targets, computed from the cells (paired by seed; "met" judges the mean only)."""
    lines = [
        "### Targets (paired by seed: method minus reference, mean ± std over seeds)",
        "",
        "| ε | quantity | target (paper) | measured | met |",
        "|---|---|---|---|---|",
    ]

    def add(
        eps: float, what: str, target: str, vals: list[float], ok: Callable[[float], bool], fmt: str
    ) -> None:
        if vals:
            mean = statistics.fmean(vals)
            lines.append(
                f"| {eps:g} | {what} | {target} | {mean_std(vals, fmt)} | {'yes' if ok(mean) else 'no'} |"
            )

    n_mia = int(next(iter(rows.values()))["task"].get("mia_examples") or 1)
    se = math.sqrt(
        (2 * n_mia + 1) / (12 * n_mia * n_mia)
    )  # AUC standard error under no leakage, n vs n examples
    for eps in _epsilons(rows):
        add(
            eps,
            "RLDP vs DP-SGD flat, test perplexity change %",
            "< 0 (−1.3 … −30.5 %)",
            _relative(rows, "rldp", REFERENCE, eps),
            lambda v: v < 0,
            "{:+.1f}",
        )
        add(
            eps,
            "RLDP vs DP-SGD per-adapter (its own base), test perplexity change %",
            "< 0",
            _relative(rows, "rldp", "dpsgd_per_adapter", eps),
            lambda v: v < 0,
            "{:+.1f}",
        )
        reach = [
            steps_to_reference(r, rows.get((REFERENCE, eps, s)))
            for (m, e, s), r in rows.items()
            if m == "rldp" and e == eps
        ]
        if reach:
            reached = [v for v in reach if v is not None]
            lines.append(
                f"| {eps:g} | RLDP steps to DP-SGD flat's final val perplexity, fraction | ≤ 0.60 (0.13 … 0.43) | "
                f"reached in {len(reached)}/{len(reach)} seeds"
                + (f", {mean_std(reached)}" if reached else "")
                + f" | {'yes' if len(reached) == len(reach) and statistics.fmean(reached) <= 0.6 else 'no'} |"
            )
        add(
            eps,
            "RLDP − DP-SGD flat, MIA AUC",
            f"≤ 0 within one AUC standard error ({se:.3f})",
            paired(rows, "rldp", REFERENCE, eps, lambda r: r.get("mia_auc")),
            lambda v: v <= se,
            "{:+.3f}",
        )
        add(
            eps,
            "RLDP − DP-SGD flat, canary Jaccard",
            "≤ 0 (no worse)",
            paired(rows, "rldp", REFERENCE, eps, lambda r: r.get("canary_jaccard")),
            lambda v: v <= 0.0,
            "{:+.3f}",
        )
        add(
            eps,
            "DP-ZO Gaussian vs DP-SGD flat, test perplexity change %",
            "within a few % (≤ +5 %)",
            _relative(rows, "dpzo_gaussian", REFERENCE, eps),
            lambda v: v <= 5.0,
            "{:+.1f}",
        )
        laplace = [
            g
            for (m, e, _), r in rows.items()
            if m == "dpzo_laplace" and e == eps
            if (g := _base_gain(r)) is not None
        ]
        add(
            eps,
            "DP-ZO Laplace (pure ε), val perplexity change from the base model %",
            "≤ −1 % (non-trivial)",
            laplace,
            lambda v: v <= -1.0,
            "{:+.2f}",
        )
    lines.append("")
    return lines


def plots(rows: dict[Key, dict[str, Any]], out: Path) -> list[str]:
    """Write the PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    methods, epsilons = _methods(rows), _epsilons(rows)

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        atomic_write(out / name, lambda fh: fig.savefig(fh, dpi=110, format="png"))
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        xs, ys, es = [], [], []
        for e in epsilons:
            vals = [r["test_perplexity"] for r in _cells(rows, m, e)]
            if vals:
                xs.append(e)
                ys.append(statistics.fmean(vals))
                es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        if m in NO_EPSILON and ys:
            ax.axhline(ys[0], color="k", ls="--" if m == "nonprivate" else ":", lw=1, label=m)
        elif xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_xlabel("target ε (δ=1e-5; pure ε for dpzo_laplace)")
    ax.set_ylabel("test perplexity")
    ax.set_title("Perplexity vs ε (mean ± std over seeds)")
    ax.legend(fontsize=7)
    save(fig, "perplexity_vs_epsilon.png")

    eps_curve = 2.0 if 2.0 in epsilons else (epsilons[0] if epsilons else None)
    if eps_curve is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in methods:
            curves = [r["val_curve"] for r in _cells(rows, m, eps_curve) if r.get("val_curve")]
            if not curves:
                continue
            steps = [s for s, _ in curves[0]]
            means = [statistics.fmean(c[i][1] for c in curves if i < len(c)) for i in range(len(steps))]
            ax.plot(steps, means, marker=".", label=m, lw=2.5 if m == "rldp" else 1.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("val perplexity (mean over seeds)")
        ax.set_title(f"Held-out perplexity vs step at ε={eps_curve:g}")
        ax.legend(fontsize=7)
        save(fig, "perplexity_vs_step.png")

    if any(r.get("mia_auc") is not None for r in rows.values()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in methods:
            pts = [
                (e, statistics.fmean(v))
                for e in epsilons
                if (v := [r["mia_auc"] for r in _cells(rows, m, e) if r.get("mia_auc") is not None])
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.axhline(0.5, color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("target ε")
        ax.set_ylabel("MIA ROC AUC")
        ax.legend(fontsize=7)
        save(fig, "mia_auc_vs_epsilon.png")

    rldp = [
        r
        for (m, e, s), r in sorted(rows.items(), key=lambda kv: (kv[0][1] != eps_curve, kv[0][2]))
        if m == "rldp" and r.get("trajectories")
    ]
    if rldp:
        row = rldp[0]
        traj = row["trajectories"]
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        if "privacy/noise_multiplier" in traj:
            a1.plot(*zip(*traj["privacy/noise_multiplier"]), color="C3")
        a1.set_ylabel("effective σ")
        a1.set_title(f"RLDP at ε={row['epsilon']:g}, seed {row['seed']}: σ and per-adapter clip thresholds")
        for tag, series in sorted(traj.items()):
            if tag.startswith("privacy/clip/"):
                a2.plot(*zip(*series), lw=1, label=tag.removeprefix("privacy/clip/"))
        a2.set_yscale("log")
        a2.set_xlabel("optimizer step")
        a2.set_ylabel("clip threshold")
        if len(a2.lines) <= 12:
            a2.legend(fontsize=6)
        save(fig, "rldp_sigma_thresholds.png")
    return written


def report(results: Path) -> Path:
    rows, task, other = load_rows(results / "matrix.jsonl")
    pngs = plots(rows, results)
    commands = sorted({r["command"] for r in rows.values()})
    seeds = sorted({k[2] for k in rows})
    lines = [
        "# Privacy–utility matrix",
        "",
        "Generated by `python benchmarks/report_matrix.py` from `matrix.jsonl`, written by:",
        "",
        *[f"    {c}" for c in commands],
        "",
        f"Task: `{json.dumps(task, sort_keys=True)}`; methods: {', '.join(_methods(rows))}; "
        f"ε: {', '.join(f'{e:g}' for e in _epsilons(rows))}; seeds: {', '.join(map(str, seeds))}; "
        f"{len(rows)} cells" + (f" ({other} rows of other tasks left out)" if other else "") + ".",
        "Runs without a budget (`pretrained`: the base model, not trained; `nonprivate`) do not depend on ε: their "
        "figure is repeated in every ε column.",
        "",
        *targets(rows),
        *tables(rows),
        *[f"![{p}]({p})" for p in pngs],
        "",
    ]
    path = results / "README.md"
    text = "\n".join(lines)
    atomic_write(path, lambda fh: fh.write(text.encode()))
    return path


BEGIN, END = "<!-- matrix-summary:begin -->", "<!-- matrix-summary:end -->"


def update_summary(page: Path, results: Path) -> None:
    """Replace the block between ``BEGIN`` and ``END`` in the Markdown ``page`` with the summary: the commands,
    the test-perplexity table, the targets and the perplexity-vs-ε plot (generated, so the page never drifts)."""
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {page} has no {BEGIN} ... {END} block; add one where the summary should go")
    rows, task, _ = load_rows(results / "matrix.jsonl")
    rel = Path(os.path.relpath(results.resolve(), page.resolve().parent)).as_posix()
    resolved = page.resolve()
    shown = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(page)
    commands = sorted({r["command"] for r in rows.values()})
    refresh = f"benchmarks/report_matrix.py --summary {shown}"
    block = [
        BEGIN,
        f"<!-- generated by {refresh}; edit the generator, not this block -->",
        "",
        f"Reproduce: `{'; '.join('.venv/bin/' + c for c in commands)}`, then "
        f"`.venv/bin/python {refresh}` ({len(rows)} cells, task "
        f"`{json.dumps(task, sort_keys=True)}`).",
        "",
        *tables(rows, METRICS[:1]),
        *targets(rows),
        f"![perplexity vs ε]({rel}/perplexity_vs_epsilon.png)",
        "",
        END,
    ]
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new_text = head + "\n".join(block) + tail
    atomic_write(page, lambda fh: fh.write(new_text.encode()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory holding matrix.jsonl")
    parser.add_argument(
        "--summary",
        "--readme",
        type=Path,
        help="also refresh the summary block of this Markdown page (docs/benchmarks.md)",
    )
    args = parser.parse_args(argv)
    print(f"wrote {report(args.results)}")
    if args.summary is not None:
        update_summary(args.summary, args.results)
        print(f"updated the summary block of {args.summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
