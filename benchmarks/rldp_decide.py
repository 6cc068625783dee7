"""Does RLDP beat tuned DP-SGD? Seven ways of setting the SGD recipe's step size, run resumably, and the report.

The regime is ``configs/rldp_recipe.yaml``'s: SmolLM2-135M, LoRA r = 8 on q_proj/v_proj, 13,333 pseudo-clinical
records (private data: ``data_seed 0``) of which 5 % are held out as public notes (the same split for every
method), so 10,000 training notes; T = 32, expected Poisson batch 128, 70 steps, bf16-mixed, flat clipping C = 1,
PLD accountant, δ = 1e-5; SGD with momentum 0.9, the optimiser for which the clip norm acts as a step size.
ε ∈ {8, 2}. Validation perplexity (private validation split) is recorded for selection, test perplexity reported.

* **M1** today's default: DP-SGD at the grid's lowest rate, constant (a point of M2's grid).
* **M2** the best of 2 rates × 2 schedules (lr 0.25 / 0.5; constant / linear decay), chosen per seed on private
  validation perplexity: an oracle, tuning privacy ignored.
* **M3** the grid point chosen on public notes (``data_seed 1``, seed 0, same task) and run on the private data;
  the recipe's lr 0.5 constant when those public cells are missing (the report says so). M1 and M3 reuse M2's
  cells.
* **M4** honest tuning: the grid's 4 trials, each at ε/4, the best chosen on the private validation split by the
  exponential mechanism; trials and choice together spend ≤ ε (``private_selection.py``). At ε = 8 the trials
  (ε = 2) are M2's ε = 2 cells.
* **M5** the plateau rule (``PlateauController``, ``configs/plateau.yaml``'s settings) on the recipe.
* **M6** RLDP online from scratch (``configs/rldp_recipe.yaml``'s ``RLDPController``, ``act: sample``).
* **M7** RLDP from a prior pre-trained by ``benchmarks/rldp_pretrain.py`` (``--policy``; ``act: deterministic``);
  skipped, with a message, when no policy is given.
* **adamw** the tuned AdamW DP-SGD recipe (lr 1e-2, C = 1; ``configs/dpsgd_recipe.yaml``), as a reference.

Seeds (``--seeds N M``): N = 3 for M4, M5, M6 and the reference; M = 5 for the grid (M1, M2, M3) and M7. Cells run
in order of use: every method at ε = 8 seed by seed up to N (a complete paired comparison at ε = 8 first), then
the same at ε = 2, then the grid's and M7's extra seeds. A seed sets everything random in a cell: the LoRA
initialisation, the DP noise and the Poisson batches (the strategy's ``seed``), the controller's agent; cells of
one seed share their noise and batches across methods, which is what the pairing uses.

Each cell is one subprocess run by ``recipe_sweep.py``'s machinery (``cells.py --cell``), one JSON line in
``<out>/recipe_sweep.jsonl``; finished cells (same name and config hash) are never rerun, so the same command
continues an interrupted run. ``<out>/plan.json`` records what the run was asked for (ε, grid, seeds, policy), which
the report reads beside the JSONL. On the 2-core machine (hours of CPU)::

    .venv/bin/python benchmarks/rldp_decide.py --jobs 2 --threads 1 --report-each --policy benchmarks/results/rldp_prior/policy.zip
    .venv/bin/python benchmarks/rldp_decide.py --report      # <out>/README.md from the JSONL
    .venv/bin/python benchmarks/rldp_decide.py --quick       # tiny-llama, 4 cells, about a minute (tests)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shutil
import statistics
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import private_selection as selection
import recipe_sweep as sweep
import rldp_trajectories as trajectories
from cells import DELTA, RESULTS, ROOT
from common import command_line, format_or_dash

OUT = RESULTS / "rldp_decide"
PLAN = "plan.json"
CONFIGS = ROOT / "configs"
PRIVATE_DATA_SEED = 0
PUBLIC_DATA_SEED = sweep.PUBLIC_DATA_SEED
EPSILONS = (8.0, 2.0)
SEEDS = (3, 5)  # (M4, M5, M6, reference), (the grid: M1, M2, M3; and M7)
K_TRIALS = 4  # M4: each trial at ε/K_TRIALS
TRIAL_EPSILONS = tuple(e / K_TRIALS for e in EPSILONS)

Point = tuple[float, str]  # (learning rate, schedule)
# The sweep on public notes found lr 0.5 best for SGD m0.9 and lr 1 diverging at ε = 8.
GRID: tuple[Point, ...] = ((0.25, "constant"), (0.5, "constant"), (0.25, "linear"), (0.5, "linear"))
QUICK_GRID: tuple[Point, ...] = ((0.5, "constant"),)
RECIPE_POINT: Point = (0.5, "constant")  # configs/rldp_recipe.yaml's rate: M3's fallback, M5–M7's rate
SGD: dict[str, Any] = {"optimizer": "sgd", "momentum": 0.9, "clip": 1.0}
ADAMW: dict[str, Any] = {"optimizer": "adamw", "lr": 1e-2, "clip": 1.0}

FULL_TASK: dict[str, Any] = {
    **sweep.FULL_TASK,
    "num_records": 13333,  # 10,000 training notes after the 10 % validation, 10 % test and 5 % public splits
    "public_fraction": 0.05,
    "data_seed": PRIVATE_DATA_SEED,
}
QUICK_TASK: dict[str, Any] = {
    **sweep.QUICK_TASK,
    "public_fraction": 0.05,
    "data_seed": PRIVATE_DATA_SEED,
    # 3 steps: the controllers decide every step, and the agent takes few updates
    "controller_overrides": {"plateau": {"interval": 1}, "rldp": {"rl_interval": 1, "gradient_steps": 8}},
}

METHODS: dict[str, str] = {
    "M1": "DP-SGD at today's default: the grid's lowest rate, constant",
    "M2": "grid point chosen per seed on private validation perplexity (oracle: tuning privacy ignored)",
    "M3": f"grid point chosen on public notes (data_seed {PUBLIC_DATA_SEED}, seed 0), run on the private data",
    "M4": f"{K_TRIALS} trials at ε/{K_TRIALS}, chosen privately on the validation split; total ε ≤ target",
    "M5": "plateau rule (PlateauController, configs/plateau.yaml) on the recipe",
    "M6": "RLDP online from scratch (configs/rldp_recipe.yaml, act: sample)",
    "M7": "RLDP from the pre-trained prior (act: deterministic)",
    "adamw": "reference: the tuned AdamW DP-SGD recipe (lr 1e-2, C = 1; configs/dpsgd_recipe.yaml)",
}
CONTROLLERS = {"plateau": "M5", "rldp": "M6", "rldp_prior": "M7"}
BEST_OF_2_3 = "min(M2, M3)"
# The controllers' starting point: the grid cell at RECIPE_POINT of the same seed, which is what M5–M7 would give
# if they never moved the step size. Against it, a controller's own effect shows apart from the choice of base.
START = "start"
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("M5", START),
    ("M6", START),
    ("M7", START),
    ("M7", BEST_OF_2_3),
    ("M6", BEST_OF_2_3),
    ("M7", "M3"),
    ("M6", "M3"),
    ("M7", "M4"),
    ("M6", "M4"),
    ("M7", "M1"),
    ("M6", "M1"),
    ("M7", "M5"),
    ("M6", "M5"),
    ("M7", "M6"),
    ("M3", "M2"),
    ("adamw", "M3"),
)
# (label, method, reference, factor, strict): met when mean(method) ≤ factor·mean(reference) over paired seeds
RATIO_TARGETS: tuple[tuple[str, str, str, float, bool], ...] = (
    ("M6 ≤ M3 + 1 %", "M6", "M3", 1.01, False),
    ("M7 ≤ M3 + 1 %", "M7", "M3", 1.01, False),
    ("M7 ≤ M4 − 5 %", "M7", "M4", 0.95, False),
    ("M7 ≤ M1 − 20 %", "M7", "M1", 0.80, False),
    ("M7 < M5", "M7", "M5", 1.0, True),
)
PAIRED_TARGET = "M7 < min(M2, M3), paired 95 % interval below 0"


# ------------------------------------------------------------------------------------------------ cells
def sgd_cell(point: Point, epsilon: float, seed: int, **extra: Any) -> dict[str, Any]:
    """A DP-SGD cell of the SGD recipe at grid point ``point`` (``extra``: controller, data_seed)."""
    lr, schedule = point
    cell: dict[str, Any] = {"kind": "dpsgd", **SGD, "lr": lr, "epsilon": epsilon, "seed": seed}
    if schedule != "constant":
        cell["schedule"] = schedule
    return {**cell, **extra}


def decide_grid(
    epsilons: tuple[float, ...] = EPSILONS,
    seeds: tuple[int, int] = SEEDS,
    grid: tuple[Point, ...] = GRID,
    *,
    prior: bool = True,
    public: bool = True,
    reference: bool = True,
    base: bool = True,
) -> list[dict[str, Any]]:
    """Every cell once, in order of use: ε by ε (ε = 8 first), seed by seed up to the common seed count, each block
    holding every method, so that a paired comparison of every method at ε = 8 over N seeds is complete before ε = 2
    starts; then the extra seeds of the grid and M7, ε by ε."""
    every, more = seeds
    cells: list[dict[str, Any]] = [{"kind": "base"}] if base else []
    for eps in epsilons:
        for seed in range(every):
            cells += _block(seed, eps, grid, every=True, more=seed < more, prior=prior)
            if public and seed == 0:  # M3's selection: one seed on public notes, free
                cells += [sgd_cell(p, eps, 0, data_seed=PUBLIC_DATA_SEED) for p in grid]
            if reference:
                cells.append({"kind": "dpsgd", **ADAMW, "epsilon": eps, "seed": seed})
    for eps in epsilons:
        for seed in range(every, more):
            cells += _block(seed, eps, grid, every=False, more=True, prior=prior)
    return _unique(cells)


def _block(
    seed: int, eps: float, grid: tuple[Point, ...], *, every: bool, more: bool, prior: bool
) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = []
    if more:
        cells += [sgd_cell(p, eps, seed) for p in grid]  # M2's grid, holding M1 and M3's runs
        if prior:
            cells.append(sgd_cell(RECIPE_POINT, eps, seed, controller="rldp_prior"))
    if every:
        cells.append(sgd_cell(RECIPE_POINT, eps, seed, controller="rldp"))
        cells.append(sgd_cell(RECIPE_POINT, eps, seed, controller="plateau"))
        cells += [sgd_cell(p, eps / K_TRIALS, seed) for p in grid]  # M4's trials
    return cells


def _unique(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """First occurrence of each name: M4's trials at ε = 8 are M2's cells at ε = 2, run once."""
    seen: set[str] = set()
    out = []
    for cell in cells:
        name = sweep.cell_name(cell)
        if name not in seen:
            seen.add(name)
            out.append(cell)
    return out


def decide_config(cell: dict[str, Any], task: dict[str, Any], logdir: Path) -> dict[str, Any]:
    """The sweep's config of ``cell`` with this regime's public split and data seed, its controller, and for
    M4's trials the validation score of the private choice."""
    config = sweep.cell_config(cell, task, logdir)
    config["data"]["public_fraction"] = task["public_fraction"]
    config["data"]["data_seed"] = cell.get("data_seed", task["data_seed"])
    callbacks = config["trainer"]["callbacks"]
    if cell.get("controller"):
        callbacks.append(controller_callback(cell["controller"], task))
    if is_trial(cell):
        callbacks.append(
            {"class_path": "private_selection.ClippedValidationLoss", "init_args": {"bound": selection.BOUND}}
        )
    return config


def is_trial(cell: dict[str, Any]) -> bool:
    """Whether a cell can be one of M4's trials: a plain SGD cell on the private notes at some ε/K_TRIALS. Only
    those score the whole validation split (about a minute of forwards at full size)."""
    plain = cell["kind"] == "dpsgd" and cell.get("optimizer") == "sgd" and not cell.get("controller")
    return plain and "data_seed" not in cell and any(math.isclose(cell["epsilon"], e) for e in TRIAL_EPSILONS)


def controller_callback(controller: str, task: dict[str, Any]) -> dict[str, Any]:
    """The controller of M5–M7 with its shipped config's settings (plus the task's overrides)."""
    if controller == "plateau":
        callback = _shipped_callback("plateau.yaml", "PlateauController")
        overrides = task.get("controller_overrides", {}).get("plateau", {})
    else:
        callback = _shipped_callback("rldp_recipe.yaml", "RLDPController")
        callback["init_args"].pop("save_policy_to", None)  # the cells' agents are not kept
        if controller == "rldp_prior":
            callback["init_args"].update(act="deterministic", policy_path=task["policy_path"])
        overrides = task.get("controller_overrides", {}).get("rldp", {})
    callback["init_args"].update(overrides)
    return callback


def _shipped_callback(config_name: str, class_name: str) -> dict[str, Any]:
    config = yaml.safe_load((CONFIGS / config_name).read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"] == f"dplightning.callbacks.{class_name}":
            return copy.deepcopy({"init_args": {}, **callback})
    raise LookupError(f"configs/{config_name} has no {class_name}")


def stage_policy(policy: Path, out: Path) -> str:
    """Copy the prior to ``<out>/policies/<content hash>.zip`` and return that path as the configs name it: a
    different prior then makes different M7 configs (new cells), never one mistaken for the finished ones."""
    digest = hashlib.sha256(policy.read_bytes()).hexdigest()[:12]
    staged = out / "policies" / f"{digest}.zip"
    if not staged.exists():
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(policy, staged)
    staged = staged.resolve()
    # cells run from the repository root: a relative path keeps the config hash if the checkout moves
    return str(staged.relative_to(ROOT)) if staged.is_relative_to(ROOT) else str(staged)


# ------------------------------------------------------------------------------------------------ selection
@dataclass(frozen=True)
class Result:
    """One method's figure for one seed: the test perplexity of the run it ends with."""

    ppl: float
    cell: str
    point: Point | None = None  # the grid point a selecting method chose


@dataclass(frozen=True)
class PrivateChoice:
    """M4 for one seed: what it chose and what trials plus choice spent (``error``: why it could not)."""

    result: Result | None
    account: selection.SelectionAccount | None
    trials: int
    error: str = ""


def point_of(settings: dict[str, Any]) -> Point:
    return (float(settings["lr"]), str(settings.get("schedule", "constant")))


def point_label(point: Point) -> str:
    return f"lr {point[0]:g} {point[1]}"


def default_point(grid: tuple[Point, ...]) -> Point:
    """M1: the grid's lowest rate, constant."""
    return min((p for p in grid if p[1] == "constant"), key=lambda p: p[0])


def grid_rows(
    rows: list[dict[str, Any]], epsilon: float, data_seed: int | None = None
) -> dict[int, dict[Point, dict[str, Any]]]:
    """seed -> grid point -> row, for the plain SGD cells at ``epsilon`` on the given notes (None: private)."""
    out: dict[int, dict[Point, dict[str, Any]]] = {}
    for r in rows:
        s = r["settings"]
        plain_sgd = s["kind"] == "dpsgd" and s.get("optimizer") == "sgd" and not s.get("controller")
        if plain_sgd and s.get("data_seed") == data_seed and math.isclose(s["epsilon"], epsilon):
            out.setdefault(s["seed"], {})[point_of(s)] = r
    return out


def validation_perplexity(row: dict[str, Any]) -> float:
    """A cell's final validation perplexity for selection (inf when missing or NaN: never chosen)."""
    value = row.get("val_perplexity_after")
    return math.inf if value is None or math.isnan(value) else float(value)


def oracle_choice(by_point: dict[Point, dict[str, Any]], grid: tuple[Point, ...]) -> Point | None:
    """The grid point with the lowest validation perplexity (ties: grid order); None if the grid is incomplete."""
    if any(p not in by_point for p in grid):
        return None
    return min(grid, key=lambda p: validation_perplexity(by_point[p]))


def public_choice(public: dict[Point, dict[str, Any]], grid: tuple[Point, ...]) -> tuple[Point, bool]:
    """M3's point: the oracle choice on the public-notes runs, or the recipe's when they are incomplete (True)."""
    chosen = oracle_choice(public, grid)
    return (RECIPE_POINT, True) if chosen is None else (chosen, False)


def train_size(task: dict[str, Any]) -> int:
    """Training notes of ``task`` (the data module's rounding of the test, validation and public shares)."""
    n = int(task["num_records"])
    public = round(task.get("public_fraction", 0.0) * n)
    if task.get("public_fraction", 0.0) > 0:
        public = max(public, 1)
    return n - round(0.1 * n) - round(0.1 * n) - public


def trial_of(row: dict[str, Any]) -> selection.Trial:
    task = row["task"]
    return selection.Trial(
        sigma=float(row["sigma"]),
        sample_rate=task["batch_size"] * task["accumulate"] / train_size(task),
        steps=int(row["steps"]),
        epsilon_spent=float(row["epsilon_spent"]),
        score=float(row["clipped_val_loss"]),
        examples=int(row["selection_examples"]),
    )


def private_choice(
    by_point: dict[Point, dict[str, Any]], grid: tuple[Point, ...], target: float, seed: int
) -> PrivateChoice:
    """M4 for one seed: the exponential mechanism over the trials' clipped validation losses."""
    if any(p not in by_point for p in grid):
        return PrivateChoice(None, None, len(by_point), "trials missing")
    rows = [by_point[p] for p in grid]
    if any(r.get("clipped_val_loss") is None for r in rows):
        return PrivateChoice(None, None, len(rows), "a trial lacks its validation score")
    try:
        # the seed of the draw follows (target, seed): every report redraws the same choice
        index, spent = selection.choose(
            [trial_of(r) for r in rows], target, DELTA, selection.BOUND, (round(target * 1000), seed)
        )
    except ValueError as exc:
        return PrivateChoice(None, None, len(rows), str(exc))
    chosen = rows[index]
    return PrivateChoice(
        Result(chosen["test_perplexity_after"], chosen["cell"], grid[index]), spent, len(rows)
    )


@dataclass
class Outcome:
    """Everything the report says about one target ε."""

    epsilon: float
    results: dict[str, dict[int, Result]]
    public_point: Point
    public_fallback: bool
    private: dict[int, PrivateChoice]


def outcome(rows: list[dict[str, Any]], plan: dict[str, Any], epsilon: float) -> Outcome:
    """Each method's result per seed at target ``epsilon``, from the finished rows only."""
    grid = tuple((float(lr), str(schedule)) for lr, schedule in plan["grid"])
    results: dict[str, dict[int, Result]] = {m: {} for m in (*METHODS, START)}
    m1 = default_point(grid)
    public_point, fallback = public_choice(grid_rows(rows, epsilon, PUBLIC_DATA_SEED).get(0, {}), grid)
    for seed, by_point in sorted(grid_rows(rows, epsilon).items()):
        choices = (
            ("M1", m1),
            ("M2", oracle_choice(by_point, grid)),
            ("M3", public_point),
            (START, RECIPE_POINT),
        )
        for method, point in choices:
            if point is not None and point in by_point:
                row = by_point[point]
                results[method][seed] = Result(row["test_perplexity_after"], row["cell"], point)
    private = {
        seed: private_choice(by_point, grid, epsilon, seed)
        for seed, by_point in sorted(grid_rows(rows, epsilon / plan["k"]).items())
    }
    results["M4"] = {s: c.result for s, c in private.items() if c.result is not None}
    for r in rows:
        s = r["settings"]
        if s["kind"] != "dpsgd" or not math.isclose(s["epsilon"], epsilon):
            continue
        role = CONTROLLERS.get(s.get("controller", "")) or (
            "adamw" if s.get("optimizer") == "adamw" else None
        )
        if role is not None:
            results[role][s["seed"]] = Result(r["test_perplexity_after"], r["cell"])
    return Outcome(epsilon, results, public_point, fallback, private)


# ------------------------------------------------------------------------------------------------ statistics
def series(out: Outcome, method: str) -> dict[int, float]:
    """seed -> test perplexity of ``method``, or of the better of M2 and M3 for ``min(M2, M3)``."""
    if method == BEST_OF_2_3:
        m2, m3 = series(out, "M2"), series(out, "M3")
        return {s: min(m2[s], m3[s]) for s in sorted(m2.keys() & m3.keys())}
    return {s: r.ppl for s, r in sorted(out.results[method].items())}


@dataclass(frozen=True)
class Paired:
    """A − B over the seeds both have: mean and the paired 95 % t-interval (None below 2 seeds)."""

    seeds: int
    mean: float | None
    low: float | None
    high: float | None


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Paired:
    from scipy import stats

    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    if not diffs:
        return Paired(0, None, None, None)
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return Paired(1, mean, None, None)
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Paired(len(diffs), mean, mean - half, mean + half)


def ratio_target(a: dict[int, float], b: dict[int, float], factor: float, strict: bool) -> tuple[str, str]:
    """(value, met / not met / –): mean(a)/mean(b) over the paired seeds against ``factor``."""
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        return "–", "–"
    ratio = statistics.mean(a[s] for s in seeds) / statistics.mean(b[s] for s in seeds)
    met = ratio < factor if strict else ratio <= factor
    return f"ratio of means {ratio:.4f} ({_seeds_label(len(seeds))})", "met" if met else "not met"


def paired_target(out: Outcome) -> tuple[str, str]:
    d = paired_difference(series(out, "M7"), series(out, BEST_OF_2_3))
    if d.mean is None or d.high is None or d.low is None:
        return ("–" if d.mean is None else f"{d.mean:+.4f} (1 seed)"), "–"
    met = d.mean < 0 and d.high < 0
    return (
        f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] ({_seeds_label(d.seeds)})",
        "met" if met else "not met",
    )


def _seeds_label(n: int) -> str:
    return "1 seed" if n == 1 else f"{n} seeds"


# ------------------------------------------------------------------------------------------------ report
def default_plan() -> dict[str, Any]:
    return {
        "epsilons": list(EPSILONS),
        "grid": [list(p) for p in GRID],
        "k": K_TRIALS,
        "seeds": list(SEEDS),
        "policy": None,
        "quick": False,
    }


def load_plan(out: Path) -> dict[str, Any]:
    path = out / PLAN
    return json.loads(path.read_text()) if path.exists() else default_plan()


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _choices(results: dict[int, Result]) -> str:
    counts = Counter(r.point for r in results.values() if r.point is not None)
    return ", ".join(f"{point_label(p)} ×{n}" for p, n in counts.most_common()) or "–"


def _method_table(out: Outcome, plan: dict[str, Any]) -> list[str]:
    lines = [
        "| method | what | seeds | test ppl (mean ± sd over seeds) | grid points used |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for method, what in METHODS.items():
        results = out.results[method]
        if method == "M1":
            what = f"{what} ({point_label(default_point(_grid(plan)))})"
        values = [r.ppl for r in results.values()]
        lines.append(f"| {method} | {what} | {len(values)} | {_mean_sd(values)} | {_choices(results)} |")
    return lines


def _grid(plan: dict[str, Any]) -> tuple[Point, ...]:
    return tuple((float(lr), str(schedule)) for lr, schedule in plan["grid"])


def _per_seed_table(out: Outcome) -> list[str]:
    seeds = sorted({s for method in METHODS for s in out.results[method]})
    lines = [
        "| seed | " + " | ".join(METHODS) + " |",
        "| ---: | " + " | ".join("---:" for _ in METHODS) + " |",
    ]
    for seed in seeds:
        cells = []
        for method in METHODS:
            r = out.results[method].get(seed)
            cells.append(
                "–" if r is None else f"{r.ppl:.3f}" + (f" ({point_label(r.point)})" if r.point else "")
            )
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return lines


def _difference_table(out: Outcome) -> list[str]:
    lines = [
        "| difference (test ppl) | seeds | mean | paired 95 % t-interval |",
        "| --- | ---: | ---: | --- |",
    ]
    for a, b in COMPARISONS:
        d = paired_difference(series(out, a), series(out, b))
        if d.seeds:
            interval = "–" if d.low is None else f"[{d.low:+.4f}, {d.high:+.4f}]"
            lines.append(f"| {a} − {b} | {d.seeds} | {d.mean:+.4f} | {interval} |")
    return lines


def _target_table(out: Outcome) -> list[str]:
    lines = ["| target | value | status |", "| --- | --- | --- |"]
    for label, a, b, factor, strict in RATIO_TARGETS:
        value, status = ratio_target(series(out, a), series(out, b), factor, strict)
        lines.append(f"| {label} | {value} | {status} |")
    value, status = paired_target(out)
    return [*lines, f"| {PAIRED_TARGET} | {value} | {status} |"]


def _selection_notes(out: Outcome, plan: dict[str, Any]) -> list[str]:
    eps, k = out.epsilon, plan["k"]
    m3 = (
        f"M3: public-notes cells missing or incomplete at ε = {eps:g}: the recipe's {point_label(RECIPE_POINT)} "
        "stands in for their choice."
        if out.public_fallback
        else f"M3: the public-notes runs (data_seed {PUBLIC_DATA_SEED}, seed 0) chose {point_label(out.public_point)}."
    )
    lines = [
        m3,
        "",
        f"M5–M7 start from the recipe's {point_label(RECIPE_POINT)} (configs/rldp_recipe.yaml, from an earlier "
        "sweep on public notes); `start` in the differences is that grid cell of the same seed, what they would "
        "give if they never moved the step size. When M3's choice is another point, M5–M7 − M3 mixes the "
        "controller's effect with the choice of starting point; M5–M7 − start is the controller's own.",
        "",
        f"M4: each trial is a DP-SGD run at ε/{k} = {eps / k:g} (δ = {DELTA:g}) on the same training notes. The "
        "trials are composed with the PLD accountant (jointly, as k·T subsampled Gaussian releases) and the choice "
        "is the exponential mechanism (Dwork & Roth, Thm 3.10) on the mean over the validation split of "
        f"min(per-example loss, {selection.BOUND:g} nats), whose sensitivity is {selection.BOUND:g}/n; it gets "
        "ε_sel = target − ε_trials, and sequential composition (Thm 3.16) gives the total (see "
        "benchmarks/private_selection.py). The total is what the procedure spends when only the chosen model is "
        "released: to be reproducible and explainable, this benchmark draws the choice from a seed it states and "
        "publishes every trial's validation figures, which a real use would keep private.",
        "",
        "| seed | trials | ε_trials (PLD) | ε_sel | total ε | ≤ target | chosen |",
        "| ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for seed, choice in out.private.items():
        a = choice.account
        if a is None:
            lines.append(f"| {seed} | {choice.trials} | – | – | – | – | not chosen: {choice.error} |")
            continue
        ok = "yes" if a.total <= eps * (1 + 1e-9) else "NO"
        chosen = point_label(choice.result.point) if choice.result and choice.result.point else "–"
        lines.append(
            f"| {seed} | {choice.trials} | {a.trials_epsilon:.4f} | {a.selection_epsilon:.4f} | {a.total:.4f} "
            f"| {ok} | {chosen} |"
        )
    return lines


def epsilon_section(rows: list[dict[str, Any]], plan: dict[str, Any], epsilon: float) -> list[str]:
    out = outcome(rows, plan, epsilon)
    return [
        f"## ε = {epsilon:g}",
        "",
        *_method_table(out, plan),
        "",
        *_per_seed_table(out),
        "",
        "Paired differences (same seed; negative = the first method is better):",
        "",
        *_difference_table(out),
        "",
        "Targets (– : not enough finished cells):",
        "",
        *_target_table(out),
        "",
        *_selection_notes(out, plan),
        "",
    ]


def roles(settings: dict[str, Any], plan: dict[str, Any]) -> str:
    """Which methods a cell serves."""
    if settings["kind"] == "base":
        return "base model"
    if settings.get("controller"):
        return CONTROLLERS[settings["controller"]]
    if settings.get("optimizer") == "adamw":
        return "adamw"
    if settings.get("data_seed") == PUBLIC_DATA_SEED:
        return "M3's selection (public notes)"
    eps, out = settings["epsilon"], []
    if any(math.isclose(eps, e) for e in plan["epsilons"]):
        out.append("M1/M2 grid" if point_of(settings) == default_point(_grid(plan)) else "M2 grid")
    out += [f"M4 trial (ε = {e:g})" for e in plan["epsilons"] if math.isclose(eps * plan["k"], e)]
    return ", ".join(out) or "–"


def _within(row: dict[str, Any]) -> str:
    target, spent = row["settings"].get("epsilon"), row.get("epsilon_spent")
    if target is None or spent is None:
        return "–"
    return "yes" if spent <= target * (1 + 1e-9) else "NO"


def _sigma_cell(row: dict[str, Any]) -> str:
    steps = row.get("sigma_steps")
    if steps:  # a controller moved σ: its range over the steps
        return f"{steps['min']:.3f}–{steps['max']:.3f}"
    return format_or_dash(row.get("sigma"), ".3f")


def _sigma_over_batch(row: dict[str, Any]) -> str:
    steps, batch = row.get("sigma_steps"), row["settings"].get("expected_batch")
    if steps and batch:
        return f"{steps['mean'] / batch:.4f} (mean)"
    return format_or_dash(row.get("sigma_over_batch"), ".4f")


def cells_section(rows: list[dict[str, Any]], plan: dict[str, Any]) -> list[str]:
    trained = [r for r in rows if r.get("epsilon_spent") is not None]
    over = [r["cell"] for r in trained if _within(r) == "NO"]
    verdict = (
        f"ε spent ≤ target in every one of the {len(trained)} private cells (M4's trials: their ε/{plan['k']})."
        if not over
        else f"ε spent EXCEEDS the target in: {', '.join(over)}."
    )
    lines = [
        "## Cells",
        "",
        verdict,
        "",
        "| cell | serves | seed | ε target | ε spent | ≤ target | σ | σ/B | C | steps | val ppl | test ppl "
        "| clipped val loss | fit s | threads | load before/after |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        s, clip = r["settings"], r.get("clip_steps")
        c = f"{clip['min']:.3g}–{clip['max']:.3g}" if clip else format_or_dash(s.get("clip"), "g")
        lines.append(
            f"| {r['cell']} | {roles(s, plan)} | {s.get('seed', '–')} | {format_or_dash(s.get('epsilon'), 'g')} "
            f"| {format_or_dash(r.get('epsilon_spent'), '.4f')} | {_within(r)} | {_sigma_cell(r)} | {_sigma_over_batch(r)} "
            f"| {c} | {r['steps']} | {format_or_dash(r.get('val_perplexity_after'), '.3f')} "
            f"| {r['test_perplexity_after']:.3f} | {format_or_dash(r.get('clipped_val_loss'), '.4f')} "
            f"| {r['fit_wall_s']:.0f} | {r['threads']} "
            f"| {r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f} |"
        )
    return lines


def _header(rows: list[dict[str, Any]], plan: dict[str, Any]) -> list[str]:
    lines = [
        "# Does RLDP beat tuned DP-SGD? (SmolLM2-135M, LoRA r=8 on q_proj/v_proj, SGD recipe regime)",
        "",
        "Generated by `.venv/bin/python benchmarks/rldp_decide.py --report` from "
        f"[{sweep.JSONL}]({sweep.JSONL}) and [{PLAN}]({PLAN}); do not edit by hand. What each method is and how "
        "the cells are run: the docstring of benchmarks/rldp_decide.py.",
        "",
    ]
    if rows:
        task = rows[-1]["task"]
        lines += [
            f"Task: {task['model']}, {task['num_records']} records (pseudo_clinical, private data_seed "
            f"{PRIVATE_DATA_SEED}), {train_size(task)} training notes after the validation, test and "
            f"{task['public_fraction']:.0%} public splits; T = {task['max_length']}, expected batch "
            f"{task['batch_size'] * task['accumulate']} (Poisson), {task['steps']} steps, {task['precision']}, "
            f"flat clipping C = 1, PLD accountant, δ = {DELTA:g}; SGD momentum 0.9. Selection on validation "
            "perplexity, figures on test perplexity.",
            "",
            f"Command: `{rows[-1]['command']}`",
            "",
        ]
    grid = ", ".join(point_label(p) for p in _grid(plan))
    lines += [
        f"Grid of M1–M4: {grid}. Seeds: {plan['seeds'][0]} (M4–M6, adamw), {plan['seeds'][1]} (grid, M7); a seed "
        "sets the LoRA initialisation, the DP noise and the Poisson batches, shared by the methods' cells of that seed."
    ]
    if plan.get("policy") is None:
        lines += ["", "M7 not run: no prior policy was given (`--policy`, from benchmarks/rldp_pretrain.py)."]
        # an earlier invocation may have run M7 cells; their rows still count below
    else:
        lines += ["", f"M7's prior: `{plan['policy']}` (content-addressed copy)."]
    if plan.get("quick"):
        lines += [
            "",
            "**--quick run**: tiny-llama, a few steps, a subset of the methods: checks the machinery only.",
        ]
    return [*lines, ""]


def trajectories_section(out: Path, rows: list[dict[str, Any]], plan: dict[str, Any]) -> list[str]:
    """Plots of the step size, σ and clip that M5–M7 chose, one per (ε, seed) whose controller cells have logs."""
    seeds = sorted({r["settings"]["seed"] for r in rows if r["settings"].get("controller")})
    images = []
    for eps in plan["epsilons"]:
        for seed in seeds:
            path = trajectories.write_plot(out, rows, eps, seed)
            if path is not None:
                images.append(f"![ε = {eps:g}, seed {seed}]({path.name})")
    if not images:
        return []
    return [
        "",
        "## Trajectories",
        "",
        "Effective step size lr·C relative to the recipe's (under SGD the update scales with it), σ and C per "
        "optimizer step, from the cells' TensorBoard logs (`benchmarks/rldp_trajectories.py`).",
        "",
        *images,
    ]


def report(out: Path) -> Path:
    """``<out>/README.md`` from the JSONL and the plan only."""
    all_rows = sweep.load_rows(out / sweep.JSONL)
    rows = list({r["cell"]: r for r in all_rows if r["status"] == "ok"}.values())  # newest row of each cell
    plan = load_plan(out)
    lines = _header(rows, plan)
    for eps in plan["epsilons"]:
        lines += epsilon_section(rows, plan, eps)
    lines += trajectories_section(out, rows, plan)
    lines += cells_section(rows, plan)
    failed = sorted({r["cell"] for r in all_rows if r["status"] != "ok"} - {r["cell"] for r in rows})
    if failed:
        lines += ["", "Failed (rerun by the next invocation): " + ", ".join(failed)]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ main
def _seeds(values: list[int] | None, quick: bool) -> tuple[int, int]:
    if not values:
        return (1, 1) if quick else SEEDS
    if len(values) > 2 or min(values) < 1:
        raise SystemExit("error: --seeds takes one or two counts ≥ 1: N [M]")
    return (values[0], values[-1])


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    task = dict(QUICK_TASK if args.quick else FULL_TASK)
    if args.steps:
        task["steps"] = args.steps
    if args.policy is not None:
        task["policy_path"] = stage_policy(args.policy, out)
    else:
        print(
            "M7 (RLDP from the prior policy): skipped, no --policy given; pre-train one with "
            "benchmarks/rldp_pretrain.py and pass --policy <policy.zip>",
            flush=True,
        )
    plan = {
        "epsilons": [8.0] if args.quick else list(EPSILONS),
        "grid": [list(p) for p in (QUICK_GRID if args.quick else GRID)],
        "k": K_TRIALS,
        "seeds": list(_seeds(args.seeds, args.quick)),
        "policy": task.get("policy_path"),
        "quick": args.quick,
    }
    (out / PLAN).write_text(json.dumps(plan, indent=2) + "\n")
    cells = decide_grid(
        tuple(plan["epsilons"]),
        (plan["seeds"][0], plan["seeds"][1]),
        _grid(plan),
        prior=args.policy is not None,
        public=not args.quick,
        reference=not args.quick,
        base=not args.quick,
    )
    if args.only:  # e.g. one cell on a free core beside a running grid (the plan above is the same)
        unknown = set(args.only) - {sweep.cell_name(c) for c in cells}
        if unknown:
            raise SystemExit(f"--only: no such cell in this plan: {', '.join(sorted(unknown))}")
        cells = [c for c in cells if sweep.cell_name(c) in args.only]
    command = command_line("rldp_decide.py", argv)
    failures = sweep.run_cells(cells, task, out, args, command, report, decide_config)
    print(report(out))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sweep.add_run_arguments(parser, OUT)
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="N",
        help=f"N [M]: seeds of M4–M6 and the reference, and of the grid and M7 (default {SEEDS[0]} {SEEDS[1]}; "
        "1 with --quick)",
    )
    parser.add_argument(
        "--policy", type=Path, help="M7's prior (benchmarks/rldp_pretrain.py); M7 skipped without"
    )
    parser.add_argument("--only", nargs="+", help="run only these cells of the plan (names as printed)")
    args = parser.parse_args(argv)
    if args.policy is not None and not args.policy.is_file():
        parser.error(f"--policy {args.policy}: no such file; pre-train one with benchmarks/rldp_pretrain.py")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="dplightning-rldp-decide-")) if args.quick else OUT
    if args.report:
        print(report(args.out))
        return 0
    return run(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
