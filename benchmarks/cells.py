"""One benchmark cell: a ``dplightning fit``-style run in a fresh subprocess, and what it reports.

A cell is a LightningCLI config (what ``dplightning fit --config`` reads) written to a file by a harness
(``recipe_sweep.py``, ``gap_closure.py``, ``rldp_decide.py``, ``run_matrix.py``) and run here with ``--cell``:
the cell validates once before training, trains, tests, runs whatever audit callbacks the config names, reads σ
and the clip norm back from its TensorBoard scalars and prints one JSON object (``CELL_RESULT {...}``). A fresh
interpreter per cell makes its peak RSS its own (``os.wait4``) and a crash lose only that cell.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DELTA = 1e-5


def config_hash(config: dict[str, Any]) -> str:
    """Hash of a cell's config without where it logs (so moving ``--out`` keeps finished cells)."""
    clean = copy.deepcopy(config)
    clean["trainer"].pop("logger", None)
    # DP-SGD cells of seed 0 run before the strategy's seed was written into their config ran with seed 0, the
    # strategy's default then: the same run, so the same hash (their results stay valid).
    strategy = clean["trainer"].get("strategy") or {}
    if strategy.get("init_args", {}).get("seed") == 0:
        del strategy["init_args"]["seed"]
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16]


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


AUDIT_KEYS = {
    "audit/mia/loss/auc": "mia_auc",
    "audit/mia/reference/auc": "mia_reference_auc",
    "audit/mia/loss/auc_se": "mia_auc_se",
    "audit/mia/loss/members": "mia_members",
    "audit/mia/reference/auc_se": "mia_reference_auc_se",
    "audit/mia/loss/tpr@0.01fpr": "mia_tpr_at_1pct_fpr",
    "audit/mia/reference/tpr@0.01fpr": "mia_reference_tpr_at_1pct_fpr",
    "audit/canary/r1/exposure": "canary_exposure",
    "audit/canary/r4/exposure": "canary_exposure_r4",
    "audit/canary/r8/exposure": "canary_exposure_r8",
    "audit/canary/not_inserted/exposure": "canary_exposure_not_inserted",
    "audit/canary/r8/jaccard": "canary_jaccard_r8",
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
    step_times: list[float] = []

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

    class StepTimer(pl.Callback):
        # one training batch: forward, backward, clipping, noise and the optimizer step (no validation)
        def on_train_batch_start(self, *args: Any) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            step_times.append(time.perf_counter() - self.started)

    trainer.callbacks.extend([ValCurve(), StepTimer()])
    trainer.validate(model, datamodule=data, verbose=False)  # step 0 of the curve
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - started
    if (
        curve and curve[-1][0] != trainer.global_step
    ):  # the interval did not divide the steps: validate the end
        trainer.validate(model, datamodule=data, verbose=False)
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
        # the median training batch: a step's cost without the validations and audits inside fit
        "median_batch_s": statistics.median(step_times) if step_times else None,
        "train_s": sum(
            step_times
        ),  # training batches only: fit's wall time also holds validations and audits
        "trajectories": _scalars(logdir, ("privacy/noise_multiplier", "privacy/clip", "rldp/")),
        **_audits(trainer),
    }


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
    parser.add_argument("--cell", type=Path, required=True, help="the cell's config file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print("CELL_RESULT " + json.dumps(run_cell(args.cell)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
