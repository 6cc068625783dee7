"""DP-SGD recipe sweep: which (optimiser, lr, clip norm) makes private LoRA on SmolLM2-135M learn at large batch.

The shipped regime (20 steps of expected batch 8) closes only a few per cent of the log-perplexity gap between the
base model and non-private LoRA. Published DP fine-tuning recipes use large logical batches, many steps, a
constant fairly large learning rate and a small clip norm; this sweep measures that regime on this machine.

Each cell is one ``dplightning fit``-style run, built and executed by ``cells.py``: a config
written to ``<out>/configs/<cell>.yaml``, run in a fresh subprocess (``cells.py --cell``), one JSON line
appended to ``<out>/recipe_sweep.jsonl``. A cell is keyed by its name (its settings) and the hash of its config:
finished cells are never rerun, failed ones are.

Tuning data: the seeded pseudo-clinical generator with ``data_seed = 1``, i.e. public synthetic notes that are
not the training/test notes of the matrix (``data_seed = 0``); tuning hyper-parameters on them costs no privacy.

Sizes::

    .venv/bin/python benchmarks/recipe_sweep.py                # the grid, most informative cells first
    .venv/bin/python benchmarks/recipe_sweep.py --only base nonprivate_adamw_lr0.005
    .venv/bin/python benchmarks/recipe_sweep.py --quick        # tiny-llama, 2 cells, seconds (tests)
    .venv/bin/python benchmarks/recipe_sweep.py --report       # <out>/README.md from the JSONL
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cells import DELTA, RESULTS, append_row, config_hash, run_subprocess
from common import command_line, format_or_dash

OUT = RESULTS / "recipe_sweep"
JSONL = "recipe_sweep.jsonl"
PUBLIC_DATA_SEED = 1  # not the matrix's data_seed 0: tuning on these notes spends no privacy

# N = 10^4 training notes (80 % of the records; 10 % val, 10 % test), expected Poisson batch 128, T = 32 tokens.
# Validation and test are capped (batches of 64) so evaluation stays a small share of a cell's time.
FULL_TASK: dict[str, Any] = {
    "model": "smollm2-135m",
    "num_records": 12500,
    "max_length": 32,
    "batch_size": 128,
    "accumulate": 1,
    "eval_batch_size": 64,
    "steps": 70,
    "val_batches": 4,
    "test_batches": 8,
    "precision": "bf16-mixed",
}
QUICK_TASK: dict[str, Any] = {
    "model": "tiny-llama",
    "num_records": 400,
    "max_length": 32,
    "batch_size": 16,
    "accumulate": 2,  # exercises the logical batch = batch_size × accumulate_grad_batches path
    "eval_batch_size": 16,
    "steps": 3,
    "val_batches": 1,
    "test_batches": 1,
    "precision": "bf16-mixed",
}


def cell_name(cell: dict[str, Any]) -> str:
    """A cell's key from its settings (stable: finished cells are found again by it), or its ``name``."""
    if "name" in cell:
        return str(cell["name"])
    if cell["kind"] == "base":
        return "base"
    name = _cell_stem(cell)
    return f"{name}_s{cell['seed']}" if "seed" in cell else name


def _cell_stem(cell: dict[str, Any]) -> str:
    name = f"{cell['kind']}_{cell['optimizer']}"
    if cell.get("momentum"):
        name += f"_m{cell['momentum']:g}"
    name += f"_lr{cell['lr']:g}"
    if cell.get("schedule", "constant") != "constant":
        name += f"_{cell['schedule']}"
    if cell.get("grad_clip"):
        name += f"_gc{cell['grad_clip']:g}"
    if cell["kind"] == "dpsgd":
        name += f"_C{cell['clip']:g}_eps{cell['epsilon']:g}"
    # keys only the benchmarks built on this sweep use (its own cells lack them, so their names are unchanged)
    if cell.get("controller"):
        name += f"_{cell['controller']}"
    if "data_seed" in cell:
        name += f"_data{cell['data_seed']}"
    return name


def grid() -> list[dict[str, Any]]:
    """The full grid, most informative first: the references, the likeliest AdamW recipe (lr 1e-2, C=1) at both
    ε, SGD with momentum 0.9 (the optimiser for which the clip norm is a step size), then one axis at a time."""
    cells: list[dict[str, Any]] = [
        {"kind": "base"},
        {"kind": "nonprivate", "optimizer": "adamw", "lr": 5e-3},
        {"kind": "nonprivate", "optimizer": "adamw", "lr": 1e-2},
        {"kind": "nonprivate", "optimizer": "adamw", "lr": 2e-2},
    ]
    # With every example clipped, SGD's update is lr·C·(mean clipped direction + noise); momentum 0.9 takes
    # ~10× the step of plain SGD. The noisy update of the ~4.6e5 LoRA coordinates has norm ≈ σ/B·C·√d ≈ 2.5 at
    # ε=8, so lr 0.25–1 moves about as far per step as AdamW at 1e-2.
    dp: list[tuple[str, float, float, float, float, str]] = [
        ("adamw", 0.0, 1e-2, 1.0, 8.0, "constant"),
        ("adamw", 0.0, 1e-2, 1.0, 2.0, "constant"),
        ("sgd", 0.9, 0.5, 1.0, 8.0, "constant"),
        ("sgd", 0.9, 1.0, 1.0, 8.0, "constant"),
        ("sgd", 0.9, 0.25, 1.0, 8.0, "constant"),
        ("sgd", 0.9, 2.0, 1.0, 8.0, "constant"),
        ("adamw", 0.0, 1e-2, 1.0, 8.0, "linear"),
        ("adamw", 0.0, 2e-2, 1.0, 8.0, "linear"),
        ("adamw", 0.0, 1e-2, 0.1, 8.0, "constant"),
        ("adamw", 0.0, 5e-3, 1.0, 8.0, "constant"),
        ("adamw", 0.0, 5e-3, 1.0, 2.0, "constant"),
    ]
    for optimizer, momentum, lr, clip, eps, schedule in dp:
        cell: dict[str, Any] = {
            "kind": "dpsgd",
            "optimizer": optimizer,
            "lr": lr,
            "clip": clip,
            "epsilon": eps,
        }
        if momentum:
            cell["momentum"] = momentum
        if schedule != "constant":
            cell["schedule"] = schedule
        cells.append(cell)
    return cells


QUICK_GRID = [
    {"kind": "base"},
    {"kind": "dpsgd", "optimizer": "adamw", "lr": 1e-2, "clip": 1.0, "epsilon": 8.0},
]


def cell_config(cell: dict[str, Any], task: dict[str, Any], logdir: Path) -> dict[str, Any]:
    """The LightningCLI config of one cell (what ``dplightning fit --config`` would read)."""
    accumulate = task["accumulate"]
    steps = 0 if cell["kind"] == "base" else task["steps"]
    trainer: dict[str, Any] = {
        "accelerator": "cpu",
        "precision": task["precision"],
        "max_steps": steps,
        "accumulate_grad_batches": accumulate,
        # in training batches (micro-batches): validate once, after the last optimizer step
        "val_check_interval": max(1, task["steps"] * accumulate),
        "check_val_every_n_epoch": None,
        "limit_val_batches": task["val_batches"],
        "limit_test_batches": task["test_batches"],
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(logdir), "name": "", "version": ""},
        },
        "callbacks": [],
    }
    if cell.get("grad_clip"):
        # non-private only: clip the batch gradient's global norm, as non-private fine-tuning usually does
        # (the DP strategies refuse it: their clipping is per example)
        trainer["gradient_clip_val"] = cell["grad_clip"]
    if cell["kind"] == "dpsgd":
        trainer["strategy"] = {
            "class_path": "dplightning.strategies.DPSGDStrategy",
            "init_args": {
                "target_epsilon": cell["epsilon"],
                "target_delta": DELTA,
                "max_grad_norm": cell["clip"],
                "clipping": "flat",
                "accountant": "pld",  # tighter than RDP: a smaller σ for the same (ε, δ)
                # the noise and the Poisson batches follow the cell's seed, so seeds differ in them (not only in
                # the LoRA initialisation) and a method's cells pair with the other methods' of the same seed
                "seed": cell.get("seed", 0),
                "device": "cpu",
            },
        }
        trainer["callbacks"] = [{"class_path": "dplightning.callbacks.PrivacyBudget"}]
    if task.get("downstream_notes"):  # field extraction on held-out test notes after fit
        trainer["callbacks"].append(
            {
                "class_path": "dplightning.callbacks.DownstreamAccuracy",
                "init_args": {"num_notes": task["downstream_notes"], "batch_size": task["eval_batch_size"]},
            }
        )
    seed = cell.get("seed", 0)
    return {
        "seed_everything": seed,
        "model": {
            "model_name": task["model"],
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_target_modules": ["q_proj", "v_proj"],
            "seed": seed,
            "optimizer": cell.get("optimizer", "adamw"),
            "learning_rate": cell.get("lr", 2e-3),
            # only when set, so that cells run before these options existed keep their config hash
            **({"momentum": cell["momentum"]} if cell.get("momentum") else {}),
            **({"lr_schedule": cell["schedule"]} if cell.get("schedule", "constant") != "constant" else {}),
        },
        "data": {
            "dataset": "pseudo_clinical",
            "num_records": task["num_records"],
            "max_length": task["max_length"],
            "batch_size": task["batch_size"],
            "eval_batch_size": task["eval_batch_size"],
            "val_fraction": 0.1,
            "test_fraction": 0.1,
            "public_fraction": 0.0,
            "data_seed": task.get("data_seed", PUBLIC_DATA_SEED),
            # the question/answer lines of the downstream task, in every method's training notes alike
            **({"qa_fraction": task["qa_fraction"]} if task.get("qa_fraction") else {}),
        },
        "trainer": trainer,
    }


# A cell's config from (cell, task, log directory); benchmarks that reuse the sweep's machinery pass their own.
ConfigFn = Callable[[dict[str, Any], dict[str, Any], Path], dict[str, Any]]
# Figures only some cells produce (a callback's): copied into the row when the cell reports them.
OPTIONAL_METRICS = (
    "clipped_val_loss",
    "selection_examples",
    "median_batch_s",
    "train_s",
    # the audit callbacks' figures (run_matrix.py's cells run them)
    "mia_auc",
    "mia_auc_se",
    "mia_members",
    "mia_reference_auc",
    "mia_reference_auc_se",
    "mia_tpr_at_1pct_fpr",
    "mia_reference_tpr_at_1pct_fpr",
    "canary_exposure",
    "canary_exposure_r8",
    "canary_exposure_not_inserted",
    "canary_jaccard_r8",
    "empirical_epsilon_lower_bound",
)


# ------------------------------------------------------------------------------------------------ the sweep
def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(
    cell: dict[str, Any],
    task: dict[str, Any],
    out: Path,
    threads: int,
    timeout: float,
    command: str,
    config_fn: ConfigFn = cell_config,
) -> dict[str, Any]:
    """Run one cell in its own subprocess and append its row (ok or failed) to the JSONL."""
    name = cell_name(cell)
    config = config_fn(cell, task, out / "tb" / name)
    config_path = out / "configs" / f"{name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    # a rerun must not read back the scalars of an earlier attempt
    shutil.rmtree(out / "tb" / name, ignore_errors=True)
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    load_before = os.getloadavg()
    started = time.perf_counter()
    metrics, error, peak_mb = run_subprocess(config_path, threads, timeout)
    expected_batch = task["batch_size"] * task["accumulate"]
    row: dict[str, Any] = {
        "cell": name,
        "config_hash": config_hash(config),
        "settings": {**cell, "expected_batch": expected_batch, "max_length": task["max_length"]},
        "task": task,
        "data": data_label({**task, **({"data_seed": cell["data_seed"]} if "data_seed" in cell else {})}),
        "status": "ok" if metrics is not None else "failed",
        "threads": threads,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "peak_rss_mb": peak_mb,
        "cell_wall_s": time.perf_counter() - started,
        "command": command,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if metrics is None:
        row["error"] = error
    else:
        sigma = metrics["noise_multiplier"]
        curve = metrics["val_curve"]
        row.update(
            steps=metrics["steps"],
            sigma=sigma,
            sigma_over_batch=None if sigma is None else sigma / expected_batch,
            epsilon_spent=metrics["epsilon_spent"],
            delta=metrics["delta"],
            fit_wall_s=metrics["wall_time_s"],
            step_s=metrics["wall_time_s"] / metrics["steps"] if metrics["steps"] else None,
            val_perplexity_before=curve[0][1] if curve else None,
            val_perplexity_after=curve[-1][1] if curve else None,
            test_perplexity_after=metrics["test_perplexity"],
            # the base model's test perplexity, measured by the base cell (LoRA B starts at 0, so every cell
            # starts from exactly that model); absent until the base cell has run
            test_perplexity_before=base_test_perplexity(load_rows(out / JSONL)),
            val_curve=curve,
            downstream_accuracy=metrics.get("downstream_accuracy"),
            downstream_majority_rate=metrics.get("downstream_majority_rate"),
        )
        row.update(_optional_figures(metrics))
    append_row(out / JSONL, row)
    return row


def _optional_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The optional metrics a cell reported, and the range of σ and of the clip norm over its steps when they
    moved (a controller's cell; a plain cell's σ is its ``sigma``)."""
    figures = {key: metrics[key] for key in OPTIONAL_METRICS if key in metrics}
    trajectories = metrics.get("trajectories") or {}
    for key, tag in (("sigma_steps", "privacy/noise_multiplier"), ("clip_steps", "privacy/clip_norm")):
        values = [v for _, v in trajectories.get(tag, [])]
        if values and min(values) != max(values):
            figures[key] = {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}
    return figures


def data_label(task: dict[str, Any]) -> str:
    seed = task.get("data_seed", PUBLIC_DATA_SEED)
    if seed == PUBLIC_DATA_SEED:
        return f"public synthetic notes: pseudo_clinical data_seed={seed} (training/test data: 0)"
    return f"training/test notes: pseudo_clinical data_seed={seed} (tuning data: {PUBLIC_DATA_SEED})"


def base_test_perplexity(rows: list[dict[str, Any]]) -> float | None:
    base = [r for r in rows if r["cell"] == "base" and r["status"] == "ok"]
    return base[-1]["test_perplexity_after"] if base else None


def run_cells(
    cells: list[dict[str, Any]],
    task: dict[str, Any],
    out: Path,
    args: argparse.Namespace,
    command: str,
    report_fn: Any,
    config_fn: ConfigFn = cell_config,
) -> int:
    """Run the cells of ``cells`` not finished yet (same name and config hash), ``args.jobs`` at a time; rewrite
    the report with ``report_fn(out)`` after each cell if ``args.report_each``. ``config_fn`` builds a cell's
    config (default: this sweep's). Returns the number of failures."""
    # DPLIGHTNING_THREADS is what a `dplightning fit` run reads; run_subprocess pins the cell to the same count
    os.environ["DPLIGHTNING_THREADS"] = str(args.threads)
    done = {(r["cell"], r["config_hash"]) for r in load_rows(out / JSONL) if r["status"] == "ok"}
    todo = []
    for i, cell in enumerate(cells, 1):
        name = cell_name(cell)
        if (name, config_hash(config_fn(cell, task, out / "tb" / name))) in done:
            print(f"[{i}/{len(cells)}] {name}: done already", flush=True)
        else:
            todo.append((f"[{i}/{len(cells)}] {name}", cell))
    report_lock = threading.Lock()

    def run_and_print(item: tuple[str, dict[str, Any]]) -> bool:
        label, cell = item
        row = run_one(cell, task, out, args.threads, args.cell_timeout, command, config_fn)
        if row["status"] != "ok":
            print(f"{label}: FAILED\n{row['error']}", flush=True)
            return False
        sigma = "-" if row["sigma"] is None else f"{row['sigma']:.3f}"
        print(
            f"{label}: test ppl {row['test_perplexity_after']:.3f}, σ {sigma}, steps {row['steps']}, "
            f"{row['cell_wall_s']:.0f} s",
            flush=True,
        )
        if args.report_each:
            with report_lock:
                report_fn(out)
        return True

    # each cell is its own subprocess; the references come first in the grid, so with --jobs 2 the base cell
    # may still run while the first trained cell does (that row then lacks test_perplexity_before; the report
    # reads the base figure from the base row)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        return sum(not ok for ok in pool.map(run_and_print, todo))


def sweep(args: argparse.Namespace, argv: list[str] | None) -> int:
    task = dict(QUICK_TASK if args.quick else FULL_TASK)
    if args.steps:
        task["steps"] = args.steps
    cells = QUICK_GRID if args.quick else grid()
    if args.only:
        cells = [c for c in cells if cell_name(c) in args.only]
    failures = run_cells(cells, task, args.out, args, command_line("recipe_sweep.py", argv), report)
    if not args.quick or args.report_each:
        report(args.out)
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------ report
def gap_closed(ppl: float, base: float | None, nonprivate: float | None) -> float | None:
    """Share of the base → non-private log-perplexity gap a cell closes (1 = as good as non-private)."""
    if base is None or nonprivate is None or base == nonprivate:
        return None
    return (math.log(base) - math.log(ppl)) / (math.log(base) - math.log(nonprivate))


def _optimiser(settings: dict[str, Any]) -> str:
    name = str(settings.get("optimizer", "–"))
    return f"{name} m{settings['momentum']:g}" if settings.get("momentum") else name


def report(out: Path) -> Path:
    """``<out>/README.md``: one row per finished cell, figures computed from the JSONL only."""
    rows = [r for r in load_rows(out / JSONL) if r["status"] == "ok"]
    latest = {r["cell"]: r for r in rows}  # a cell rerun after a config change: its newest row
    base = latest.get("base", {}).get("test_perplexity_after")
    nonprivate = [r for r in latest.values() if r["settings"]["kind"] == "nonprivate"]
    # the reference is the best non-private cell: an undertuned reference would overstate the gap closed
    ref = min((r["test_perplexity_after"] for r in nonprivate), default=None)
    lines = [
        "# DP-SGD recipe sweep (SmolLM2-135M, LoRA r=8 on q_proj/v_proj)",
        "",
        "Generated by `.venv/bin/python benchmarks/recipe_sweep.py --report` from "
        f"[{JSONL}]({JSONL}); do not edit by hand.",
        "",
        f"Data: public synthetic notes (pseudo-clinical generator, data_seed={PUBLIC_DATA_SEED}; the training and "
        "test notes of the matrix use data_seed=0), so tuning on them spends no privacy budget. "
        "Gap closed = (log ppl_base − log ppl_cell) / (log ppl_base − log ppl_nonprivate), on test perplexity.",
        "",
    ]
    if rows:
        task = rows[-1]["task"]
        n_train = int(task["num_records"] * 0.8)
        lines += [
            f"Task: N ≈ {n_train} training notes, T = {task['max_length']} tokens, expected batch "
            f"{task['batch_size'] * task['accumulate']} (Poisson), {task['steps']} steps, precision "
            f"{task['precision']}, flat clipping, PLD accountant, δ = {DELTA:g}.",
            "",
        ]
    lines += [
        "| cell | optimiser | lr | schedule | C | ε target | ε spent | σ | σ/B | steps | val ppl before → after "
        "| test ppl | gap closed | fit s | s/step | threads | load before/after |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in latest.items():
        s = r["settings"]
        gap = gap_closed(r["test_perplexity_after"], base, ref)
        lines.append(
            f"| {name} | {_optimiser(s)} | {format_or_dash(s.get('lr'), 'g')} "
            f"| {s.get('schedule', 'constant') if s['kind'] != 'base' else '–'} "
            f"| {format_or_dash(s.get('clip'), 'g')} "
            f"| {format_or_dash(s.get('epsilon'), 'g')} | {format_or_dash(r['epsilon_spent'], '.3f')} | {format_or_dash(r['sigma'], '.3f')} "
            f"| {format_or_dash(r['sigma_over_batch'], '.4f')} | {r['steps']} "
            f"| {format_or_dash(r['val_perplexity_before'], '.2f')} → {format_or_dash(r['val_perplexity_after'], '.2f')} "
            f"| {r['test_perplexity_after']:.2f} | {format_or_dash(gap, '.1%')} | {r['fit_wall_s']:.0f} "
            f"| {format_or_dash(r['step_s'], '.1f')} | {r['threads']} "
            f"| {r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f} |"
        )
    failed = sorted({r["cell"] for r in load_rows(out / JSONL) if r["status"] != "ok"} - set(latest))
    if failed:
        lines += ["", "Failed (rerun on the next sweep): " + ", ".join(failed)]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def add_run_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """The options every sweep-like benchmark shares (sizes, resuming, threads and parallel cells)."""
    parser.add_argument("--quick", action="store_true", help="tiny-llama, a few cells and steps (tests)")
    parser.add_argument("--report", action="store_true", help="only write <out>/README.md from the JSONL")
    parser.add_argument("--report-each", action="store_true", help="rewrite the report after every cell")
    parser.add_argument("--steps", type=int, help="override the step count of every trained cell")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"results directory (default {default_out.relative_to(RESULTS.parents[1])}, a temp dir with --quick)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per cell")
    parser.add_argument(
        "--jobs", type=int, default=1, help="cells run at once (on the 2-core machine: --jobs 2 --threads 1)"
    )
    parser.add_argument("--cell-timeout", type=float, default=3600.0, help="seconds before a cell is killed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, OUT)
    parser.add_argument("--only", nargs="+", help="run only these cells (names as printed)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="dplightning-recipes-")) if args.quick else OUT
    if args.report:
        print(report(args.out))
        return 0
    return sweep(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
