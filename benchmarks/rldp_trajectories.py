"""Step-size, σ and clip trajectories of the RLDP decision cells, read back from their TensorBoard logs.

Under SGD with momentum and every example clipped, the update scales with lr·C, so the quantity to compare across
methods is the *effective step size* lr_t·C_t relative to the recipe's lr_0·C_0: the plateau rule moves lr, RLDP
moves C, a linear schedule decays lr, plain DP-SGD keeps both. Sources, per cell directory ``<out>/tb/<cell>``:
``privacy/clip_norm`` and ``privacy/noise_multiplier`` (``PrivacyBudget``, every step), ``controller/lr``
(``PlateauController``, at its decisions); the schedule's lr is recomputed from the cell's settings
(``lr_0 · max(0, 1 − k / steps)`` for ``linear``, as ``DPLoRAModule`` builds it).

The TensorBoard logs are not kept in the repository, so the few tags the plots need are copied, once per cell, to
``<out>/trajectories/<cell>.json`` (committed beside the JSONL); a later report redraws from those copies.

Every figure is post-processing of released quantities (σ, C and lr are chosen from public data or the noisy
releases). ``rldp_decide.py --report`` calls :func:`plot_trajectories` for each (ε, seed) whose controller cells
have logs; by hand::

    .venv/bin/python benchmarks/rldp_trajectories.py --epsilon 8 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Series = dict[int, float]  # optimizer step -> value


@dataclass(frozen=True)
class Trajectory:
    """One cell's per-step controls: effective step size relative to the recipe, σ, and the clip norm."""

    label: str
    step_size: Series
    sigma: Series
    clip: Series


def read_scalars(logdir: Path) -> dict[str, Series]:
    """Every scalar tag of every event file under ``logdir`` (the later file wins on a repeated step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, Series] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: float(e.value) for e in events.Scalars(tag)})
    return scalars


def _step_function(points: Series, steps: int, start: float) -> Series:
    """``points`` (value from its step on) forward-filled over steps 0..steps-1, ``start`` before the first."""
    out: Series = {}
    value = start
    for k in range(steps):
        value = points.get(k, value)
        out[k] = value
    return out


def learning_rates(settings: dict[str, Any], scalars: dict[str, Series], steps: int) -> Series:
    """The learning rate of each optimizer step of a cell."""
    lr0 = float(settings["lr"])
    if "controller/lr" in scalars:
        return _step_function(scalars["controller/lr"], steps, lr0)
    if settings.get("schedule") == "linear":
        return {k: lr0 * max(0.0, 1.0 - k / steps) for k in range(steps)}
    return dict.fromkeys(range(steps), lr0)


def trajectory(label: str, settings: dict[str, Any], scalars: dict[str, Series], steps: int) -> Trajectory:
    """A cell's trajectory. Lightning logs a step's scalars at the global step after it, so the value logged at
    step k is the one step k-1 used; the first step's values are the first logged ones."""
    clip_logged = scalars.get("privacy/clip_norm", {})
    sigma_logged = scalars.get("privacy/noise_multiplier", {})
    if not clip_logged or not sigma_logged:
        raise ValueError(f"{label}: no privacy/clip_norm or privacy/noise_multiplier in its logs")
    shift = min(clip_logged)  # 1 when logged after the step, 0 when at it
    clip0 = clip_logged[shift]
    clip = _step_function({k - shift: v for k, v in clip_logged.items()}, steps, clip0)
    sigma = _step_function(
        {k - shift: v for k, v in sigma_logged.items()}, steps, sigma_logged[min(sigma_logged)]
    )
    lr = learning_rates(settings, scalars, steps)
    lr0 = float(settings["lr"])
    step_size = {k: lr[k] * clip[k] / (lr0 * clip0) for k in range(steps)}
    return Trajectory(label, step_size, sigma, clip)


def plot_trajectories(trajectories: list[Trajectory], title: str, path: Path) -> Path:
    """Three panels over optimizer steps: effective step size / recipe's, σ, clip norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(6, 7), sharex=True)
    panels = (
        ("step_size", "lr·C / recipe's"),
        ("sigma", "noise multiplier σ"),
        ("clip", "clip norm C"),
    )
    for ax, (field, ylabel) in zip(axes, panels, strict=True):
        for i, t in enumerate(trajectories):
            series: Series = getattr(t, field)
            steps = sorted(series)
            ax.step(steps, [series[k] for k in steps], where="post", color=f"C{i}", label=t.label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


LABELS = {"plateau": "M5 plateau rule", "rldp": "M6 RLDP online", "rldp_prior": "M7 RLDP from the prior"}


def cells_to_plot(rows: list[dict[str, Any]], epsilon: float, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, row) of the finished controller cells at (ε, seed) on the private data, after the plain DP-SGD
    cell at the recipe's grid point (lr 0.5 constant) as the reference line."""
    chosen: list[tuple[str, dict[str, Any]]] = []
    for row in rows:
        s = row["settings"]
        if row.get("status") != "ok" or s.get("kind") != "dpsgd" or s.get("optimizer") != "sgd":
            continue
        if "data_seed" in s or s.get("seed") != seed or not math.isclose(s["epsilon"], epsilon):
            continue
        controller = s.get("controller")
        if controller in LABELS:
            chosen.append((LABELS[controller], row))
        elif controller is None and s.get("schedule", "constant") == "constant" and s["lr"] == 0.5:
            chosen.insert(0, ("DP-SGD lr 0.5 constant", row))
    return chosen


TAGS = ("privacy/clip_norm", "privacy/noise_multiplier", "controller/lr")  # all that trajectory() reads


def cell_scalars(out: Path, cell: str) -> dict[str, Series] | None:
    """A cell's :data:`TAGS`: read from ``<out>/tb/<cell>`` when its logs are there (and copied to
    ``<out>/trajectories/<cell>.json``), else from that copy; None when neither exists."""
    copy = out / "trajectories" / f"{cell}.json"
    logdir = out / "tb" / cell
    if logdir.is_dir():
        scalars = {tag: series for tag, series in read_scalars(logdir).items() if tag in TAGS}
        if scalars:
            copy.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({tag: {str(k): v for k, v in sorted(s.items())} for tag, s in scalars.items()})
            copy.write_text(text + "\n")
            return scalars
    if copy.is_file():
        return {
            tag: {int(k): float(v) for k, v in s.items()} for tag, s in json.loads(copy.read_text()).items()
        }
    return None


def write_plot(out: Path, rows: list[dict[str, Any]], epsilon: float, seed: int) -> Path | None:
    """``<out>/trajectories_eps<ε>_s<seed>.png`` when a controller cell of (ε, seed) has logs or their copy;
    else the PNG an earlier report drew, if any (its cells' logs are gone); else None."""
    path = out / f"trajectories_eps{epsilon:g}_s{seed}.png"
    chosen = []
    for label, row in cells_to_plot(rows, epsilon, seed):
        scalars = cell_scalars(out, row["cell"])
        if scalars is not None:
            chosen.append((label, row, scalars))
    if not any(label in LABELS.values() for label, _, _ in chosen):
        return path if path.is_file() else None
    trajectories = [
        trajectory(label, row["settings"], scalars, int(row["steps"])) for label, row, scalars in chosen
    ]
    title = f"SGD recipe, ε = {epsilon:g}, seed {seed}: what each method did with the step size and σ"
    return plot_trajectories(trajectories, title, path)


def main(argv: list[str] | None = None) -> int:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import recipe_sweep as sweep
    from rldp_decide import OUT

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="the rldp_decide results directory")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = sweep.load_rows(args.out / "recipe_sweep.jsonl")
    path = write_plot(args.out, rows, args.epsilon, args.seed)
    print(
        path
        if path is not None
        else f"no controller cell with logs at ε = {args.epsilon:g}, seed {args.seed}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
