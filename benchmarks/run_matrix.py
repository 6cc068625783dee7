"""Privacy–utility matrix: every method × ε × seed on one fixed task, resumable, one JSON line per cell.

A *cell* is one private LoRA fine-tune, built exactly like ``dplightning fit --config``: the harness composes a
config (the shared task below + the method's strategy and callbacks + ε + seed), writes it to
``<out>/configs/<cell>.yaml`` and runs it in a fresh subprocess (``--cell``), so a cell's peak RSS is its own
(``os.wait4``) and a crash only loses that cell. Inside, the cell validates once before training, trains with a
validation every ``val_every`` steps (the perplexity-vs-step curve), tests, runs the audits when the audit
modules are installed, reads σ and clip thresholds back from its TensorBoard scalars, and prints one JSON object.

Resumable: a cell whose key ``(method, epsilon, seed, config_hash)`` already has an ``ok`` line in
``matrix.jsonl`` is not rerun; failed cells are rerun. The report step (``report_matrix.py``) turns the JSONL into
tables and plots.

Sizes::

    .venv/bin/python benchmarks/run_matrix.py                 # SmolLM2-135M, ε ∈ {0.5, 2, 8}, seeds 0 1 2
    .venv/bin/python benchmarks/run_matrix.py --quick         # tiny-llama, ε=2, seed 0, a few steps (CI)
    .venv/bin/python benchmarks/run_matrix.py --methods dpsgd_flat rldp --epsilons 2 --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EPSILONS = (0.5, 2.0, 8.0)
SEEDS = (0, 1, 2)
DELTA = 1e-5

# The task every method is measured on: SmolLM2-135M LoRA (r=8 on q_proj/v_proj), seeded pseudo-clinical notes,
# fixed train/val/test/public split (the public 5 % is used only by RLDP's reward; the others ignore it).
# Sized for 2 CPU cores, where a SmolLM2 forward+backward costs ~5 ms per token (~10 ms on one contended thread):
# one cell (20 steps of 8 notes cut to 32 tokens, 6 validations, test, audits) takes ~2 minutes on one thread,
# and the 94 cells, two at a time (--jobs 2 --threads 1), under 2 hours.
FULL_TASK: dict[str, Any] = {
    "model": "smollm2-135m",
    "num_records": 2000,
    "max_length": 32,
    "batch_size": 8,
    "eval_batch_size": 16,
    "steps": 20,
    "val_every": 4,
    "val_batches": 1,
    "test_batches": 2,
    "mia_examples": 24,
    "canaries": 4,
    "canary_references": 20,
}
QUICK_TASK: dict[str, Any] = {
    "model": "tiny-llama",
    "num_records": 200,
    "max_length": 32,
    "batch_size": 8,
    "eval_batch_size": 16,
    "steps": 6,
    "val_every": 3,
    "val_batches": 1,
    "test_batches": 1,
    "mia_examples": 16,
    "canaries": 4,
    "canary_references": 20,
}
QUICK_METHODS = ("nonprivate", "dpsgd_flat", "rldp", "dpzo_laplace")
NO_EPSILON = ("pretrained", "nonprivate")  # cells without a privacy budget: one per seed, not per ε
SEED_FREE = ("pretrained",)  # untrained: identical for every seed (LoRA B starts at 0), so run once


def _dpsgd(clipping: str, epsilon: float) -> dict[str, Any]:
    return {
        "class_path": "dplightning.strategies.DPSGDStrategy",
        "init_args": {
            "target_epsilon": epsilon,
            "target_delta": DELTA,
            "max_grad_norm": 1.0,
            "clipping": clipping,
            "accountant": "rdp",
            "device": "cpu",
        },
    }


def _dpzo(noise: str, epsilon: float, delta: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    init = {
        "noise": noise,
        "target_epsilon": epsilon,
        "target_delta": delta,
        "mu": 1e-2,
        "max_loss_diff": 1.0,
        "num_directions": 1,
        "trainable": "lora",
        "accountant": "pld",
        "device": "cpu",
    }
    init.update(extra or {})
    return {"class_path": "dplightning.strategies.DPZOStrategy", "init_args": init}


BUDGET = {"class_path": "dplightning.callbacks.PrivacyBudget"}
ADAMW = {"optimizer": "adamw", "learning_rate": 2e-3}
ZO_SGD = {"optimizer": "sgd", "learning_rate": 5e-5}  # MeZO's LoRA setting


def _lmo_params(config: str) -> dict[str, Any]:
    """The LMO mixture a recipe in ``configs/`` ships (found offline by ``dplightning privacy lmo-search``)."""
    import yaml

    return yaml.safe_load((ROOT / "configs" / config).read_text())["trainer"]["strategy"]["init_args"]["lmo"]


def _lmo_dpsgd(epsilon: float) -> dict[str, Any]:
    strategy = _dpsgd("flat_l1", epsilon)
    strategy["init_args"].update(noise="lmo", lmo=_lmo_params("lmo_dpsgd.yaml"))
    return strategy


def _method(
    strategy: dict[str, Any] | None, callbacks: list[dict[str, Any]], optim: dict[str, Any]
) -> dict[str, Any]:
    return {"strategy": strategy, "callbacks": callbacks, "optim": optim}


def _rldp_controller(steps: int) -> dict[str, Any]:
    """RLDP's controller for a ``steps``-step run: DP-SGD warm-up for the first third, then a decision every
    ``steps // 6`` steps (5 decisions in 20 steps), at most every 5 steps in longer runs (more to learn from)."""
    return {
        "class_path": "dplightning.callbacks.RLDPController",
        "init_args": {
            "rl_interval": max(1, min(steps // 6, 5)),
            "warmup_steps": steps // 3,
            "action_scope": "per_adapter",
            "public_batches": 1,
        },
    }


# method name -> (ε, planned steps) -> {strategy, callbacks, optim}. ``None`` strategy: Lightning's default (non-private).
METHODS: dict[str, Callable[[float, int], dict[str, Any]]] = {
    "pretrained": lambda e, t: _method(None, [], ADAMW),  # not trained (0 steps): the base model's figures
    "nonprivate": lambda e, t: _method(None, [], ADAMW),
    "dpsgd_flat": lambda e, t: _method(_dpsgd("flat", e), [BUDGET], ADAMW),
    "dpsgd_per_adapter": lambda e, t: _method(_dpsgd("per_adapter", e), [BUDGET], ADAMW),
    "quantile_clipping": lambda e, t: _method(
        _dpsgd("flat", e), [BUDGET, {"class_path": "dplightning.callbacks.QuantileClipping"}], ADAMW
    ),
    "automatic_clipping": lambda e, t: _method(
        _dpsgd("flat", e), [BUDGET, {"class_path": "dplightning.callbacks.AutomaticClipping"}], ADAMW
    ),
    "noise_schedule": lambda e, t: _method(
        _dpsgd("flat", e), [BUDGET, {"class_path": "dplightning.callbacks.NoiseSchedule"}], ADAMW
    ),
    "rldp": lambda e, t: _method(_dpsgd("per_adapter", e), [BUDGET, _rldp_controller(t)], ADAMW),
    "dpzo_gaussian": lambda e, t: _method(_dpzo("gaussian", e, DELTA), [BUDGET], ZO_SGD),
    "dpzo_laplace": lambda e, t: _method(_dpzo("laplace", e, 0.0), [BUDGET], ZO_SGD),
    "lmo_dpzo": lambda e, t: _method(
        _dpzo("lmo", e, DELTA, {"lmo": _lmo_params("lmo_dpzo.yaml")}), [BUDGET], ZO_SGD
    ),
    "lmo_dpsgd": lambda e, t: _method(_lmo_dpsgd(e), [BUDGET], ADAMW),
}


def method_available(name: str) -> str | None:
    """``None`` if every class the method names imports in this checkout, else why not."""
    import importlib

    spec = METHODS[name](2.0, 30)
    for entry in [spec["strategy"], *spec["callbacks"]]:
        if entry is None:
            continue
        module, _, cls = entry["class_path"].rpartition(".")
        try:
            getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as exc:
            return f"{entry['class_path']} not importable ({exc})"
    return None


def cell_config(
    method: str, epsilon: float | None, seed: int, task: dict[str, Any], logdir: Path
) -> dict[str, Any]:
    """The LightningCLI config of one cell (what ``dplightning fit --config`` would read)."""
    spec = METHODS[method](epsilon if epsilon is not None else 0.0, task["steps"])
    trainer: dict[str, Any] = {
        "accelerator": "cpu",
        "max_steps": 0 if method == "pretrained" else task["steps"],
        "val_check_interval": task["val_every"],
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
        "callbacks": copy.deepcopy(spec["callbacks"]) + audit_callbacks(task),
    }
    if spec["strategy"] is not None:
        trainer["strategy"] = copy.deepcopy(spec["strategy"])
    return {
        "seed_everything": seed,
        "model": {
            "model_name": task["model"],
            "lora_rank": 8,
            "lora_alpha": 16,
            "seed": seed,
            **spec["optim"],
        },
        "data": {
            "dataset": "pseudo_clinical",
            "num_records": task["num_records"],
            "max_length": task["max_length"],
            "batch_size": task["batch_size"],
            "eval_batch_size": task["eval_batch_size"],
            "public_fraction": 0.05,
            "data_seed": 0,  # the split is fixed across seeds; the seed varies sampling, noise, init and the agent
        },
        "trainer": trainer,
    }


def config_hash(config: dict[str, Any]) -> str:
    """Hash of a cell's config without where it logs (so moving ``--out`` keeps finished cells)."""
    clean = copy.deepcopy(config)
    clean["trainer"].pop("logger", None)
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ one cell
def _scalars(logdir: Path, prefixes: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars under ``logdir`` whose tag starts with one of ``prefixes``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith(prefixes):
                out.setdefault(tag, []).extend((int(e.step), float(e.value)) for e in acc.Scalars(tag))
    return out


def audit_callbacks(task: dict[str, Any]) -> list[dict[str, Any]]:
    """The audits every cell runs at the end of fit (sized by the task: they cost forwards on the model)."""
    return [
        {
            "class_path": "dplightning.callbacks.MembershipInferenceAudit",
            "init_args": {"max_examples": task["mia_examples"], "batch_size": task["eval_batch_size"]},
        },
        {
            "class_path": "dplightning.callbacks.CanaryAudit",
            "init_args": {
                "num_canaries": task["canaries"],
                "repeats": [1, 4],
                "reference_samples": task["canary_references"],
            },
        },
    ]


AUDIT_KEYS = {
    "audit/mia/loss/auc": "mia_auc",
    "audit/mia/reference/auc": "mia_reference_auc",
    "audit/mia/loss/tpr@0.01fpr": "mia_tpr_at_1pct_fpr",
    "audit/canary/r1/exposure": "canary_exposure",
    "audit/canary/r4/exposure": "canary_exposure_r4",
    "audit/canary/r1/jaccard": "canary_jaccard",
    "audit/canary/r4/jaccard": "canary_jaccard_r4",
    "audit/epsilon_lower_bound": "empirical_epsilon_lower_bound",
    "downstream/accuracy": "downstream_accuracy",
    "downstream/majority_rate": "downstream_majority_rate",
    # benchmarks/private_selection.py's ClippedValidationLoss: the score of a private choice between runs
    "selection/clipped_val_loss": "clipped_val_loss",
    "selection/examples": "selection_examples",
}


def _audits(trainer: Any) -> dict[str, Any]:
    """The audit callbacks' figures, under the matrix's column names."""
    metrics: dict[str, float] = {}
    for callback in trainer.callbacks:
        metrics.update(getattr(callback, "metrics", None) or {})
        result = getattr(callback, "result", None)  # DownstreamAccuracy's last ExtractionResult
        if hasattr(result, "metrics"):
            metrics.update(result.metrics())
    return {name: float(metrics[key]) for key, name in AUDIT_KEYS.items() if key in metrics}


def run_cell(config_path: Path) -> dict[str, Any]:
    """Train, validate and test one cell in this process; returns its metrics (see module docstring)."""
    import warnings

    import lightning.pytorch as pl

    from dplightning.cli import _lightning_cli_class
    from dplightning.data import TextDataModule
    from dplightning.module import DPLoRAModule

    warnings.filterwarnings("ignore")
    curve: list[tuple[int, float]] = []

    class ValCurve(pl.Callback):
        # on_validation_end: after the module's on_validation_epoch_end has logged this round's perplexity
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            ppl = trainer.callback_metrics.get("val/perplexity")
            if ppl is not None and not trainer.sanity_checking:
                curve.append((trainer.global_step, float(ppl)))

    cli = _lightning_cli_class()(
        DPLoRAModule,
        TextDataModule,
        args=["--config", str(config_path)],
        run=False,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    trainer.callbacks.append(ValCurve())
    trainer.validate(model, datamodule=data, verbose=False)  # step 0 of the curve
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - started
    test = trainer.test(model, datamodule=data, verbose=False)[0]
    strategy = trainer.strategy
    private = hasattr(strategy, "accountant")
    logdir = Path(trainer.logger.log_dir)
    return {
        "steps": trainer.global_step,
        "epsilon_spent": strategy.epsilon() if private else None,
        "delta": strategy.target_delta if private else None,
        "noise_multiplier": strategy.effective_noise_multiplier if private else None,
        "val_curve": curve,
        "final_val_perplexity": curve[-1][1] if curve else None,
        "test_perplexity": float(test["test/perplexity"]),
        "wall_time_s": wall,
        "trajectories": _scalars(logdir, ("privacy/noise_multiplier", "privacy/clip", "rldp/")),
        **_audits(trainer),
    }


# ------------------------------------------------------------------------------------------------ the grid
def load_done(path: Path) -> set[tuple[str, float | None, int, str]]:
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("status") == "ok":
                    done.add((row["method"], row["epsilon"], row["seed"], row["config_hash"]))
    return done


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line with a single write + fsync, so an interrupted run never leaves half a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def run_subprocess(
    config_path: Path, threads: int, timeout: float
) -> tuple[dict[str, Any] | None, str, float]:
    """Run one cell in a fresh interpreter: (metrics or None, stderr tail, peak RSS in MiB of that process)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--cell", str(config_path), "--threads", str(threads)],
            stdout=out,
            stderr=err,
            env=env,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    peak_mb = usage.ru_maxrss / 1024
    marker = [line for line in stdout.splitlines() if line.startswith("CELL_RESULT ")]
    if proc.returncode != 0 or not marker:
        return None, stderr[-2000:] or f"exit code {proc.returncode}", peak_mb
    return json.loads(marker[-1][len("CELL_RESULT ") :]), "", peak_mb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny-llama, ε=2, seed 0, few steps (minutes; CI)"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=sorted(METHODS), help="default: every available method"
    )
    parser.add_argument("--epsilons", nargs="+", type=float, help=f"default: {EPSILONS} ({{2}} with --quick)")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"default: {SEEDS} ({{0}} with --quick)")
    parser.add_argument("--steps", type=int, help="override the step budget of every cell")
    parser.add_argument(
        "--val-every", type=int, help="override the validation interval (steps) of every cell"
    )
    parser.add_argument(
        "--out", type=Path, help="results directory (default benchmarks/results, or a temp dir with --quick)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per cell")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells run at once (2 jobs x 1 thread gave ~10%% more throughput than 1 x 2 on the 2-core machine; "
        "wall times then include the neighbour's contention)",
    )
    parser.add_argument("--cell-timeout", type=float, default=3600.0, help="seconds before a cell is killed")
    parser.add_argument("--cell", type=Path, help=argparse.SUPPRESS)  # internal: run one cell config
    args = parser.parse_args(argv)

    if args.cell is not None:
        import torch

        torch.set_num_threads(args.threads)
        print("CELL_RESULT " + json.dumps(run_cell(args.cell)), flush=True)
        return 0

    task = dict(QUICK_TASK if args.quick else FULL_TASK)
    if args.steps:
        task["steps"] = args.steps
    if args.val_every:
        task["val_every"] = args.val_every
    out = args.out or (Path(tempfile.mkdtemp(prefix="dplightning-matrix-")) if args.quick else RESULTS)
    methods = args.methods or list(QUICK_METHODS if args.quick else METHODS)
    epsilons = args.epsilons or ([2.0] if args.quick else list(EPSILONS))
    seeds = args.seeds or ([0] if args.quick else list(SEEDS))
    missing = {m: why for m in methods if (why := method_available(m))}
    for name, why in missing.items():
        print(f"skipping {name}: {why}", flush=True)
    methods = [m for m in methods if m not in missing]

    jsonl = out / "matrix.jsonl"
    done = load_done(jsonl)
    command = shlex.join(
        ["python", "benchmarks/run_matrix.py", *(argv if argv is not None else sys.argv[1:])]
    )
    # ε-major in the order given, then seed, then method: an interrupted grid has whole ε rows first
    cells = [
        (m, None if m in NO_EPSILON else e, seeds[0] if m in SEED_FREE else s)
        for e in epsilons
        for s in seeds
        for m in methods
    ]
    cells = list(dict.fromkeys(cells))  # runs that do not depend on ε (or the seed) once
    todo: list[tuple[str, str, str, float | None, int, dict[str, Any], str]] = []
    for i, (method, epsilon, seed) in enumerate(cells, 1):
        name = f"{method}_eps{epsilon if epsilon is not None else 'inf'}_seed{seed}"
        config = cell_config(method, epsilon, seed, task, out / "tb" / name)
        key = (method, epsilon, seed, config_hash(config))
        if key in done:
            print(f"[{i}/{len(cells)}] {name}: done already", flush=True)
        else:
            todo.append((f"[{i}/{len(cells)}] {name}", name, method, epsilon, seed, config, key[3]))

    def run_one(item: tuple[str, str, str, float | None, int, dict[str, Any], str]) -> bool:
        label, name, method, epsilon, seed, config, chash = item
        config_path = out / "configs" / f"{name}.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        # a rerun (failed or interrupted cell) must not read back the σ/threshold scalars of an earlier attempt
        shutil.rmtree(out / "tb" / name, ignore_errors=True)
        config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        started = time.perf_counter()
        metrics, error, peak_mb = run_subprocess(config_path, args.threads, args.cell_timeout)
        row = {
            "method": method,
            "epsilon": epsilon,
            "seed": seed,
            "config_hash": chash,
            "task": task,
            "status": "ok" if metrics is not None else "failed",
            "peak_rss_mb": peak_mb,
            "cell_wall_s": time.perf_counter() - started,
            "command": command,
            "jobs": args.jobs,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(metrics or {"error": error}),
        }
        append_row(jsonl, row)
        if metrics is None:
            print(f"{label}: FAILED\n{error}", flush=True)
            return False
        eps = metrics["epsilon_spent"]
        print(
            f"{label}: test ppl {metrics['test_perplexity']:.3f}, "
            f"ε {'∞' if eps is None else f'{eps:.3f}'}, {row['cell_wall_s']:.0f} s, {peak_mb:.0f} MiB",
            flush=True,
        )
        return True

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each cell is its own subprocess
        failures = sum(not ok for ok in pool.map(run_one, todo))
    print(f"results: {jsonl}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
