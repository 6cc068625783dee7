"""Which method at which ε: every dplightning method in the DP-SGD recipe's regime, each tuned, audited, resumable.

The regime is ``rldp_decide.py``'s (the SGD recipe where private LoRA learns): SmolLM2-135M, LoRA r = 8 on
q_proj/v_proj, 13,333 pseudo-clinical records (private data ``data_seed 0``: 10,000 training notes, 10 %
validation, 10 % test, 5 % public notes), T = 32, expected Poisson batch 128, 70 DP-SGD steps, bf16-mixed, PLD
accountant, δ = 1e-5 (DP-ZO Laplace: pure ε). Methods:

* ``pretrained`` the base model (no training) and ``nonprivate`` LoRA (AdamW, global gradient clip 1);
* ``dpsgd_flat`` the SGD recipe (momentum 0.9, C = 1) at the learning rate and schedule chosen on public notes:
  ``rldp_decide.py``'s M3, whose public tuning cells it shares (they live in that benchmark's results); its grid
  cells differ from M3's by the audits' canaries (about 144 inserted notes among 10,000);
* ``automatic_clipping`` and ``quantile_clipping`` the same optimiser with the callback of that name;
* ``rldp`` the RLDP controller starting from DP-SGD flat's tuned point (its mean action is that DP-SGD run), from
  the pre-trained prior with ``--policy`` (``act: deterministic``), else online from scratch (``act: sample``);
  it is not tuned further: its controller moves the step size and σ;
* ``dpzo_gaussian`` and ``dpzo_laplace`` zeroth-order DP (``DPZOStrategy``), given the steps that their
  forward-only steps buy in DP-SGD's wall-clock (below).

**Tuning** (free: public notes, ``data_seed 1``, seed 0, ε = 8): every method but RLDP gets its own learning
rate (and μ for DP-ZO) from a small grid, chosen on the public validation perplexity; ``plan.json`` records each choice and
the report lists every tuning cell. **DP-ZO's steps**: before its cells, short timing runs of DP-SGD and DP-ZO
(one cell at a time, alternating, one thread: the grid's thread count) measure the median training batch of
each (the load average beside them; alternating keeps the ratio when other jobs share the machine); DP-ZO gets
``round(70 × t_DP-SGD / t_DP-ZO)`` steps. Equal steps would be the wrong comparison for a method whose step is
two forwards; both counts are reported.

**Grid**: ε ∈ {8, 2} for every private method and ε = 0.5 for ``dpsgd_flat`` and ``rldp``, seeds 0, 1, 2 (seed by
seed, so an interrupted grid holds whole seeds). Every grid cell validates 7 times (the curves), is tested, and
runs the audits: loss / min-k / reference-calibrated membership inference on 2,000 training notes against 2,000
never-trained notes (validation + test; AUC standard error by Hanley–McNeil) and 32 + 32 secret canaries
inserted once or 8 times, each with probability ½ (exposure, and the one-run ε lower bound of Steinke et al.
2023 from the once-inserted ones). **Audit power**: ``control_memorise``, non-private LoRA on 1,000 training
notes for the same 70 steps (about 9 epochs), scored against 1,000 non-members: the attacks must find *that*
model's members, or a low AUC elsewhere means nothing.

**Downstream block** (``--stage downstream``, after the grid): field-extraction accuracy on 500 held-out test
notes needs the question/answer line inside the training text, so T = 128 (notes with the line are 57–107
tokens), expected batch 64 and 40 DP-SGD steps (``gap_closure.py --downstream``'s task). It runs what the
downstream targets concern: ``pretrained``, ``nonprivate``, ``dpsgd_flat``, ``dpzo_gaussian`` and
``dpzo_laplace`` at ε = 2, seeds 0, 1, 2, with the learning rates tuned above and DP-ZO's steps from timing runs
at this task's size. One cell at a time: a DP-SGD cell at B = 64, T = 128 peaked at 13–16.5 GB (before the
loss was chunked).

Cells are subprocesses (``cells.py``), rows in ``<out>/recipe_sweep.jsonl``; finished cells (same name and
config hash) are never rerun, so the same command continues. ``report_matrix.py`` writes ``<out>/README.md`` and
the plots from the JSONL and ``plan.json``::

    .venv/bin/python benchmarks/run_matrix.py --jobs 2 --threads 1 --policy benchmarks/results/rldp_prior/policy.zip
    .venv/bin/python benchmarks/run_matrix.py --stage tune     # only the tuning and timing cells
    .venv/bin/python benchmarks/report_matrix.py               # the report, from the JSONL
    .venv/bin/python benchmarks/run_matrix.py --quick          # tiny-llama, a minute or two (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gap_closure as gap
import recipe_sweep as sweep
import rldp_decide as decide
from cells import DELTA, RESULTS
from common import command_line

OUT = RESULTS / "matrix"
PLAN = "plan.json"
PUBLIC_DATA_SEED = sweep.PUBLIC_DATA_SEED
TUNING_EPSILON = 8.0
EPSILONS = (8.0, 2.0)
LOW_EPSILON = 0.5
LOW_EPSILON_METHODS = ("dpsgd_flat", "rldp")
SEEDS = (0, 1, 2)
METHODS = (
    "pretrained",
    "nonprivate",
    "dpsgd_flat",
    "automatic_clipping",
    "quantile_clipping",
    "rldp",
    "dpzo_gaussian",
    "dpzo_laplace",
)
PRIVATE = METHODS[2:]
TIMING_ROUNDS = 3
TIMING_STEPS = 6
TIMING_THREADS = 1  # the grid's cells run on one thread each (--jobs 2 --threads 1 on 2 cores)
VALIDATIONS = 7  # per grid cell: the validation-perplexity curve

FULL_TASK: dict[str, Any] = {
    **decide.FULL_TASK,
    "mia_examples": 2000,
    "canaries": 32,
    "canary_repeats": [1, 8],
    "canary_references": 50,
}
QUICK_TASK: dict[str, Any] = {
    **decide.QUICK_TASK,
    "accumulate": 1,
    "mia_examples": 16,
    "canaries": 4,
    "canary_repeats": [1, 8],
    "canary_references": 10,
}
# the downstream block: gap_closure.py's field-extraction task (T = 128, B = 64, 40 steps, the answer line in the
# training text); only what the downstream targets concern, at ε = 2
DOWNSTREAM_TASK: dict[str, Any] = {**FULL_TASK, **gap.DOWNSTREAM_TASK}
QUICK_DOWNSTREAM_TASK: dict[str, Any] = {**QUICK_TASK, **gap.DOWNSTREAM_QUICK_TASK}
DOWNSTREAM_METHODS = ("pretrained", "nonprivate", "dpsgd_flat", "dpzo_gaussian", "dpzo_laplace")
DOWNSTREAM_EPSILON = 2.0
# the audit-power control: non-private on 1,000 training notes (70 steps × 128 ≈ 9 epochs), 1,000 test notes
CONTROL_DATA = {"num_records": 4000, "val_fraction": 0.1, "test_fraction": 0.6}
QUICK_CONTROL_DATA = {"num_records": 200, "val_fraction": 0.1, "test_fraction": 0.5}

SGD = {"optimizer": "sgd", "momentum": 0.9, "clip": 1.0}
# method -> its tuning grid (settings on top of the method's fixed ones); dpsgd_flat's is rldp_decide's grid
TUNING: dict[str, list[dict[str, Any]]] = {
    "nonprivate": [{"lr": 5e-3}, {"lr": 1e-2}, {"lr": 2e-2}],
    "automatic_clipping": [{"lr": 0.25}, {"lr": 0.5}, {"lr": 1.0}],
    "quantile_clipping": [{"lr": 0.25}, {"lr": 0.5}, {"lr": 1.0}],
    # the ZO update is lr·ĝ·z with ĝ ≈ (clipped loss difference)/(2μ): μ trades clipping bias against noise as C
    # does, and the step scales with lr/μ; MeZO's LoRA setting is lr 5e-5, μ 1e-2
    "dpzo_gaussian": [
        {"lr": 2.5e-5, "mu": 1e-2},
        {"lr": 5e-5, "mu": 1e-2},
        {"lr": 1e-4, "mu": 1e-2},
        {"lr": 1.5e-5, "mu": 3e-3},
    ],
}
TUNING["dpzo_laplace"] = TUNING["dpzo_gaussian"]
QUICK_TUNING: dict[str, list[dict[str, Any]]] = {
    "nonprivate": [{"lr": 1e-2}],
    "automatic_clipping": [{"lr": 0.5}],
    "quantile_clipping": [{"lr": 0.5}],
    "dpzo_gaussian": [{"lr": 5e-5, "mu": 1e-2}, {"lr": 1e-4, "mu": 1e-2}],
    "dpzo_laplace": [{"lr": 5e-5, "mu": 1e-2}],
}
QUICK_METHODS = ("pretrained", "nonprivate", "dpsgd_flat", "rldp", "dpzo_laplace")  # ε = 8, seed 0 only


# ------------------------------------------------------------------------------------------------ cells
def method_cell(method: str, settings: dict[str, Any], epsilon: float | None, seed: int) -> dict[str, Any]:
    """A cell of ``method`` with ``settings`` (lr, schedule, μ, steps) at ε (None: non-private) and ``seed``."""
    lr = settings.get("lr")
    if method == "pretrained":
        return {"kind": "base"}
    if method in ("nonprivate", "control_memorise"):
        return {"kind": "nonprivate", "optimizer": "adamw", "lr": lr, "grad_clip": 1.0, "seed": seed}
    if method.startswith("dpzo"):
        cell = {"kind": "dpzo", "optimizer": "sgd", "lr": lr, "mu": settings["mu"], "epsilon": epsilon}
        return {**cell, "noise": method.removeprefix("dpzo_"), "steps": settings["steps"], "seed": seed}
    point = (lr, settings.get("schedule", "constant"))
    if method == "rldp":
        return decide.sgd_cell(point, epsilon, seed, controller=settings["controller"])
    cell = decide.sgd_cell(point, epsilon, seed)
    if method != "dpsgd_flat":
        cell["clipping"] = method.removesuffix("_clipping")
    return cell


def _label(settings: dict[str, Any]) -> str:
    parts = [f"lr{settings['lr']:g}"]
    if settings.get("schedule", "constant") != "constant":
        parts.append(settings["schedule"])
    if "mu" in settings:
        parts.append(f"mu{settings['mu']:g}")
    return "_".join(parts)


def tuning_cells(tuning: dict[str, list[dict[str, Any]]], zo_steps: int | None) -> list[dict[str, Any]]:
    """The tuning cells of every method but dpsgd_flat and rldp (public notes, seed 0, ε = 8); DP-ZO's only once
    its step count is known."""
    cells = []
    for method, grid in tuning.items():
        if method.startswith("dpzo") and zo_steps is None:
            continue
        for settings in grid:
            full = {**settings, "steps": zo_steps} if method.startswith("dpzo") else settings
            eps = None if method == "nonprivate" else TUNING_EPSILON
            cell = method_cell(method, full, eps, 0)
            name = f"tune_{method}_{_label(settings)}"
            cells.append(
                {**cell, "name": name, "method": method, "role": "tune", "data_seed": PUBLIC_DATA_SEED}
            )
    return cells


def timing_cells(rounds: int, prefix: str = "timing") -> list[dict[str, Any]]:
    """Short DP-SGD and DP-ZO runs on public notes, alternating, to time one training batch of each."""
    cells = []
    for r in range(rounds):
        for method in ("dpsgd_flat", "dpzo_gaussian"):
            settings = (
                {"lr": 0.5} if method == "dpsgd_flat" else {"lr": 5e-5, "mu": 1e-2, "steps": TIMING_STEPS}
            )
            cell = method_cell(method, settings, TUNING_EPSILON, 0)
            cells.append(
                {
                    **cell,
                    "name": f"{prefix}_{method}_r{r}",
                    "method": method,
                    "role": "timing",
                    "data_seed": PUBLIC_DATA_SEED,
                    "steps": TIMING_STEPS,
                }
            )
    return cells


def grid_cells(
    methods: tuple[str, ...],
    tuned: dict[str, dict[str, Any]],
    epsilons: tuple[float, ...],
    seeds: tuple[int, ...],
    low_epsilon: bool = True,
) -> list[dict[str, Any]]:
    """Seed by seed: every method with its tuned settings at every ε (and the low ε for DP-SGD and RLDP)."""
    cells: list[dict[str, Any]] = []
    if "pretrained" in methods:
        cells.append({"kind": "base", "name": "pretrained", "method": "pretrained", "role": "grid"})
    for seed in seeds:
        for method in methods:
            if method == "pretrained" or method not in tuned:
                continue
            if method == "nonprivate":
                eps_list: tuple[float | None, ...] = (None,)
            else:
                low = (LOW_EPSILON,) if method in LOW_EPSILON_METHODS and low_epsilon else ()
                eps_list = (*epsilons, *low)
            for eps in eps_list:
                cell = method_cell(method, tuned[method], eps, seed)
                name = f"{method}_eps{'inf' if eps is None else f'{eps:g}'}_s{seed}"
                cells.append({**cell, "name": name, "method": method, "role": "grid", "audit": True})
    return cells


def control_cell(tuned: dict[str, dict[str, Any]]) -> dict[str, Any]:
    cell = method_cell("control_memorise", tuned["nonprivate"], None, 0)
    return {
        **cell,
        "name": "control_memorise_s0",
        "method": "control_memorise",
        "role": "control",
        "audit": True,
    }


def downstream_cells(
    tuned: dict[str, dict[str, Any]], zo_steps: int | None, seeds: tuple[int, ...]
) -> list[dict[str, Any]]:
    """The downstream block: each method of :data:`DOWNSTREAM_METHODS` that is tuned, at ε = 2 (seed by seed),
    DP-ZO with the step count timed at this task's size (its cells wait for it)."""
    cells: list[dict[str, Any]] = [
        {"kind": "base", "name": "downstream_pretrained", "method": "pretrained", "role": "downstream"}
    ]
    for seed in seeds:
        for method in DOWNSTREAM_METHODS[1:]:
            if method not in tuned or (method.startswith("dpzo") and zo_steps is None):
                continue
            settings = {**tuned[method], "steps": zo_steps} if method.startswith("dpzo") else tuned[method]
            eps = None if method == "nonprivate" else DOWNSTREAM_EPSILON
            cell = method_cell(method, settings, eps, seed)
            name = f"downstream_{method}_eps{'inf' if eps is None else f'{eps:g}'}_s{seed}"
            cells.append({**cell, "name": name, "method": method, "role": "downstream"})
    return cells


# ------------------------------------------------------------------------------------------------ configs
def matrix_config(cell: dict[str, Any], task: dict[str, Any], logdir: Path) -> dict[str, Any]:
    """The LightningCLI config of a matrix cell: rldp_decide's for the SGD-recipe cells, DP-ZO's strategy for
    DP-ZO, the clipping callbacks, the validation curve and the audits of grid and control cells."""
    if cell["kind"] == "dpzo":
        config = decide.decide_config({**cell, "kind": "nonprivate"}, task, logdir)
        config["trainer"]["strategy"] = _dpzo_strategy(cell)
        config["trainer"]["callbacks"].insert(0, {"class_path": "dplightning.callbacks.PrivacyBudget"})
    else:
        config = decide.decide_config(cell, task, logdir)
    trainer = config["trainer"]
    if (
        cell.get("role") == "timing"
    ):  # timing runs time training batches; scoring the downstream task is waste
        trainer["callbacks"] = [
            c for c in trainer["callbacks"] if not c["class_path"].endswith("DownstreamAccuracy")
        ]
    steps = int(cell.get("steps", task["steps"])) if cell["kind"] != "base" else 0
    trainer["max_steps"] = steps
    accumulate = int(task["accumulate"])  # val_check_interval counts training batches, not optimizer steps
    trainer["val_check_interval"] = max(1, steps * accumulate)
    if cell.get("clipping") == "automatic":
        trainer["callbacks"].append({"class_path": "dplightning.callbacks.AutomaticClipping"})
    elif cell.get("clipping") == "quantile":
        trainer["callbacks"].append({"class_path": "dplightning.callbacks.QuantileClipping"})
    if cell.get("method") == "control_memorise":
        control = QUICK_CONTROL_DATA if task["model"] == "tiny-llama" else CONTROL_DATA
        config["data"].update(control)
    if cell.get("audit"):
        if steps:
            trainer["val_check_interval"] = max(1, math.ceil(steps / VALIDATIONS) * accumulate)
        trainer["callbacks"] += audit_callbacks(task, int(cell.get("seed", 0)))
    return config


def _dpzo_strategy(cell: dict[str, Any]) -> dict[str, Any]:
    pure = cell["noise"] == "laplace"
    return {
        "class_path": "dplightning.strategies.DPZOStrategy",
        "init_args": {
            "noise": cell["noise"],
            "target_epsilon": cell["epsilon"],
            "target_delta": 0.0 if pure else DELTA,
            "mu": cell["mu"],
            "max_loss_diff": 1.0,
            "num_directions": 1,
            "trainable": "lora",
            "accountant": "pld",
            "seed": int(cell.get("seed", 0)),
            "device": "cpu",
        },
    }


def audit_callbacks(task: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Membership inference on training vs never-trained notes, and the secret canaries (inserted before fit)."""
    return [
        {
            "class_path": "dplightning.callbacks.MembershipInferenceAudit",
            "init_args": {
                "max_examples": task["mia_examples"],
                "batch_size": task["eval_batch_size"],
                "nonmembers": "val+test",
                "seed": seed,
            },
        },
        {
            "class_path": "dplightning.callbacks.CanaryAudit",
            "init_args": {
                "num_canaries": task["canaries"],
                "repeats": list(task["canary_repeats"]),
                "reference_samples": task["canary_references"],
                "seed": seed,
            },
        },
    ]


# ------------------------------------------------------------------------------------------------ choices
def _ok(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["cell"]: r for r in rows if r["status"] == "ok"}  # newest row of each cell


def zo_steps_from(
    rows: list[dict[str, Any]], rounds: int, dpsgd_steps: int, prefix: str = "timing"
) -> dict[str, Any] | None:
    """DP-ZO's step count from the timing cells: DP-SGD's steps × the median over rounds of (DP-SGD batch time /
    DP-ZO batch time); None until every timing cell has run."""
    done = _ok(rows)
    pairs = []
    for r in range(rounds):
        sgd, zo = done.get(f"{prefix}_dpsgd_flat_r{r}"), done.get(f"{prefix}_dpzo_gaussian_r{r}")
        if sgd is None or zo is None or not sgd.get("median_batch_s") or not zo.get("median_batch_s"):
            return None
        pairs.append((sgd["median_batch_s"], zo["median_batch_s"]))
    ratio = statistics.median(s / z for s, z in pairs)
    timed = [done[f"{prefix}_{m}_r{r}"] for r in range(rounds) for m in ("dpsgd_flat", "dpzo_gaussian")]
    return {
        "threads": sorted({r.get("threads") for r in timed}),
        # other jobs on the machine slow both kinds of step; alternating them keeps the ratio, the loads say how busy
        "loadavg_1min": [r["loadavg_before"][0] for r in timed if r.get("loadavg_before")],
        "dpsgd_batch_s": [s for s, _ in pairs],
        "dpzo_batch_s": [z for _, z in pairs],
        "ratio": ratio,
        "dpsgd_steps": dpsgd_steps,
        "zo_steps": max(1, round(dpsgd_steps * ratio)),
    }


def tuned_settings(
    rows: list[dict[str, Any]],
    decide_rows: list[dict[str, Any]],
    tuning: dict[str, list[dict[str, Any]]],
    zo_steps: int | None,
    grid: tuple[decide.Point, ...],
    controller: str,
) -> dict[str, dict[str, Any]]:
    """Each method's chosen settings (lowest public validation perplexity) once all its tuning cells have run;
    dpsgd_flat's from rldp_decide's public cells (its M3: the recipe's point while they are missing, flagged)."""
    done = _ok(rows)
    tuned: dict[str, dict[str, Any]] = {"pretrained": {}}
    for method, candidates in tuning.items():
        scored = [(s, done.get(f"tune_{method}_{_label(s)}")) for s in candidates]
        if any(row is None for _, row in scored):
            continue
        best, row = min(scored, key=lambda item: decide.validation_perplexity(item[1]))  # type: ignore[arg-type]
        tuned[method] = {**best, "tuning_val_perplexity": decide.validation_perplexity(row)}  # type: ignore[arg-type]
        if method.startswith("dpzo"):
            if zo_steps is None:
                del tuned[method]
                continue
            tuned[method]["steps"] = zo_steps
    public = {
        decide.point_of(r["settings"]): r
        for r in _ok(decide_rows).values()
        if not r["settings"].get("role")  # the matrix's own cells (timing runs) may share rldp_decide's file
        and r["settings"].get("data_seed") == PUBLIC_DATA_SEED
        and r["settings"].get("kind") == "dpsgd"
        and not r["settings"].get("controller")
        and r["settings"].get("optimizer") == "sgd"
        and math.isclose(r["settings"]["epsilon"], TUNING_EPSILON)
    }
    point, fallback = decide.public_choice(public, grid)
    tuned["dpsgd_flat"] = {"lr": point[0], "schedule": point[1], "fallback": fallback}
    # RLDP starts as tuned DP-SGD (its mean action keeps the base step size and σ); its controller moves them
    tuned["rldp"] = {"lr": point[0], "schedule": point[1], "controller": controller}
    return tuned


# ------------------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    import report_matrix

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    task = dict(QUICK_TASK if args.quick else FULL_TASK)
    if args.steps:
        task["steps"] = args.steps
    decide_out = out if args.quick else decide.OUT
    methods = tuple(args.methods or (QUICK_METHODS if args.quick else METHODS))
    tuning = {m: g for m, g in (QUICK_TUNING if args.quick else TUNING).items() if m in methods}
    grid = decide.QUICK_GRID if args.quick else decide.GRID
    if args.policy is not None:
        task["policy_path"] = decide.stage_policy(args.policy, out)
        controller = "rldp_prior"
    else:
        controller = "rldp"
        if "rldp" in methods:
            print(
                "rldp: no --policy given, so RLDP runs online from scratch (rldp_decide.py's M6)", flush=True
            )
    rounds = 1 if args.quick else TIMING_ROUNDS
    command = command_line("run_matrix.py", argv)
    failures = 0

    def rows() -> list[dict[str, Any]]:
        return sweep.load_rows(out / sweep.JSONL)

    def run_cells(
        cells: list[dict[str, Any]],
        jobs: int,
        task_: dict[str, Any],
        where: Path,
        config_fn: Any,
        threads: int | None = None,
        report_fn: Any = report_matrix.report,
    ) -> int:
        jobs_args = argparse.Namespace(**{**vars(args), "jobs": jobs, "threads": threads or args.threads})
        return sweep.run_cells(cells, task_, where, jobs_args, command, report_fn, config_fn)

    # 1. timing, one cell at a time on one thread whatever --threads says: DP-ZO's step count comes from it
    if any(m.startswith("dpzo") for m in methods):
        failures += run_cells(timing_cells(rounds), 1, task, out, matrix_config, threads=TIMING_THREADS)
    calibration = zo_steps_from(rows(), rounds, task["steps"])
    zo_steps = None if calibration is None else calibration["zo_steps"]
    # 2. tuning: dpsgd_flat's public cells are rldp_decide's (shared: run into its results), the others here
    if "dpsgd_flat" in methods:
        public = [decide.sgd_cell(p, TUNING_EPSILON, 0, data_seed=PUBLIC_DATA_SEED) for p in grid]
        failures += run_cells(
            public,
            args.jobs,
            decide.QUICK_TASK if args.quick else decide.FULL_TASK,
            decide_out,
            decide.decide_config,
            report_fn=lambda _: None,  # these cells belong to rldp_decide's results: its report is its own
        )
    failures += run_cells(tuning_cells(tuning, zo_steps), args.jobs, task, out, matrix_config)
    tuned = tuned_settings(
        rows(), sweep.load_rows(decide_out / sweep.JSONL), tuning, zo_steps, grid, controller
    )
    previous = json.loads((out / PLAN).read_text()) if (out / PLAN).exists() else {}
    plan = {
        # what the rows of this regime share (the staged prior's path changes RLDP's cells only)
        "task": {k: v for k, v in task.items() if k != "policy_path"},
        "methods": list(methods),
        "epsilons": [8.0] if args.quick else list(EPSILONS),
        "low_epsilon": None if args.quick else LOW_EPSILON,
        "seeds": list(args.seeds or ((0,) if args.quick else SEEDS)),
        "tuning": tuning,
        "tuned": tuned,
        "timing": calibration,
        "policy": task.get("policy_path"),
        "decide_out": str(decide_out.resolve().relative_to(decide.ROOT))
        if decide_out.resolve().is_relative_to(decide.ROOT)
        else str(decide_out),
        "quick": args.quick,
    }
    if "downstream" in previous:  # a later --stage tune or grid keeps the downstream block's record
        plan["downstream"] = previous["downstream"]
    (out / PLAN).write_text(json.dumps(plan, indent=2) + "\n")
    missing = [m for m in methods if m not in tuned]
    if missing:
        print(f"not tuned yet (their grid cells wait): {', '.join(missing)}", flush=True)
    if args.stage in ("grid", "all"):
        eps = tuple(plan["epsilons"])
        cells = grid_cells(methods, tuned, eps, tuple(plan["seeds"]), low_epsilon=not args.quick)
        if "nonprivate" in tuned:
            cells.insert(1, control_cell(tuned))
        failures += run_cells(cells, args.jobs, task, out, matrix_config)
    if args.stage in ("downstream", "all"):
        failures += run_downstream(args, out, tuned, plan, rounds, run_cells)
    print(report_matrix.report(out))
    return 1 if failures or missing else 0


def run_downstream(
    args: argparse.Namespace,
    out: Path,
    tuned: dict[str, dict[str, Any]],
    plan: dict[str, Any],
    rounds: int,
    run_cells: Any,
) -> int:
    """The downstream block, one cell at a time; DP-ZO's steps timed first at this task's size."""
    task = dict(QUICK_DOWNSTREAM_TASK if args.quick else DOWNSTREAM_TASK)
    timing_cells_ = timing_cells(rounds, "timing_downstream")
    failures = run_cells(timing_cells_, 1, task, out, matrix_config, threads=TIMING_THREADS)
    timing = zo_steps_from(sweep.load_rows(out / sweep.JSONL), rounds, task["steps"], "timing_downstream")
    plan["downstream"] = {
        "task": task,
        "methods": list(DOWNSTREAM_METHODS),
        "epsilon": DOWNSTREAM_EPSILON,
        "timing": timing,
    }
    (out / PLAN).write_text(json.dumps(plan, indent=2) + "\n")
    cells = downstream_cells(tuned, None if timing is None else timing["zo_steps"], tuple(plan["seeds"]))
    return failures + run_cells(cells, 1, task, out, matrix_config)


def main(argv: list[str] | None = None) -> int:
    argv_list = sys.argv[1:] if argv is None else argv
    if "--cell" in argv_list:  # a cell started by an older harness process: run it as cells.py would
        import cells

        return cells.main(argv_list)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sweep.add_run_arguments(parser, OUT)
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all (a few with --quick)")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"default {' '.join(map(str, SEEDS))}")
    parser.add_argument(
        "--stage",
        choices=("tune", "grid", "downstream", "all"),
        default="all",
        help="tune: tuning + timing only; grid: and the grid; downstream: tuning + the downstream block",
    )
    parser.add_argument(
        "--policy", type=Path, help="RLDP's prior (benchmarks/rldp_pretrain.py); online without"
    )
    args = parser.parse_args(argv)
    if args.policy is not None and not args.policy.is_file():
        parser.error(f"--policy {args.policy}: no such file; pre-train one with benchmarks/rldp_pretrain.py")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="dplightning-matrix-")) if args.quick else OUT
    if args.report:
        import report_matrix

        print(report_matrix.report(args.out))
        return 0
    return run(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
