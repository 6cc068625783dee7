"""Pieces shared by the benchmark scripts: quiet logging and Trainers, /proc memory counters, machine description,
writing the results."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl

# What a timed or measured fit leaves out: logging, checkpoints, progress output and any validation.
_TRAIN_ONLY: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}


def format_or_dash(value: float | None, spec: str) -> str:
    """A table cell: ``value`` formatted by ``spec``, or an en dash where the figure is missing."""
    return "–" if value is None else format(value, spec)


def status_kb(field: str) -> int:
    """One ``kB`` field (``VmRSS``, ``VmHWM``, ...) of ``/proc/self/status``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def quiet() -> None:
    """Silence library warnings and progress bars so the benchmark's own output is readable."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "lightning", "lightning.pytorch", "dplightning", "opacus"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def train_only_trainer(**settings: Any) -> pl.Trainer:
    """A Lightning ``Trainer`` that trains and does nothing else (no logger, checkpoints, progress bar, model
    summary or validation); ``settings`` add to those (strategy, steps, callbacks, precision, ...)."""
    import lightning.pytorch as pl

    return pl.Trainer(**(_TRAIN_ONLY | settings))


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def machine(threads: int | None = None, packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Where a benchmark ran: cores, threads, versions of torch and of ``packages``, load at start, CPU/GPU."""
    import torch

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_at_start": os.getloadavg(),
        "cpu": cpu_model(),
    }
    for package in packages:
        with contextlib.suppress(Exception):
            info[package] = __import__(package).__version__
    return info


def write_results(prefix: str, result: dict[str, Any], markdown: str) -> None:
    """Write ``<prefix>.json`` (the raw figures) and ``<prefix>.md`` (the report), each whole or not at all."""
    from dplightning.checkpoint_io import atomic_write

    json_text = json.dumps(result, indent=1, default=str) + "\n"
    atomic_write(prefix + ".json", lambda fh: fh.write(json_text.encode()))
    atomic_write(prefix + ".md", lambda fh: fh.write(markdown.encode()))


def publish(result: dict[str, Any], markdown: str, prefix: str | None) -> None:
    """Print the report and, with a ``prefix``, write it with the raw figures (:func:`write_results`)."""
    print(markdown)
    if prefix:
        write_results(prefix, result, markdown)
        print(f"wrote {prefix}.json and {prefix}.md")


def command_line(script: str, argv: list[str] | None = None) -> str:
    """How this run was started, from the repository root (no machine-specific paths)."""
    import shlex
    import sys

    args = sys.argv[1:] if argv is None else argv
    return f".venv/bin/python benchmarks/{script}" + "".join(" " + shlex.quote(a) for a in args)
