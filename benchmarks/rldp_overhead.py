"""Per-step overhead of the RLDP controller over plain DP-SGD (overhead).

Two kinds of Lightning fit on identical data and seeds, alternated ``--repeats`` times (A, B, A, B):

- ``dpsgd``: ``DPSGDStrategy`` alone;
- ``rldp``: the same strategy + ``RLDPController(rl_interval=10, warmup_steps=0, learning_starts=1)``.

Strategy as in ``configs/rldp.yaml``: target ε=8, δ=1e-5, C=1, ``per_adapter`` clipping, ``rdp`` accountant, Poisson
sampling (expected B=8), seed 0; ``max_steps=--planned-steps`` (1000) so that σ calibration and the budget guard
see a realistic plan, and a callback stops each fit after ``--warmup + --steps`` optimizer steps. LoRA r=8 on
q_proj/v_proj, AdamW. Data: ``TextDataModule`` over a JSON-lines file of pseudo-clinical notes (three notes per
example, so every example is truncated to exactly T=128 tokens), ``public_fraction=0.05``,
``eval_batch_size=8`` (the public batch scored per decision; ``configs/rldp.yaml`` also uses eval = train batch
size). ``limit_val_batches=0``, no logger, no checkpoints, no progress bar.

``learning_starts=1`` (default 4) so that SAC gradient steps happen inside a short timed window: with the default
they start only at the 5th decision (step 50). Every other controller argument is the default.

Timing: a callback pair around the controller (``[StepStart, RLDPController, StepEnd]``) times every optimizer step
from ``on_train_batch_start`` to ``on_train_batch_end`` *including* the controller's own hooks (the clip-count
release every step; every 10th step the decision: public-loss forward of ``public_batches`` batches, observation
with two ε queries, replay-buffer add, SAC gradient step, SAC action, budget guard, applying clips and σ). The
controller's methods are also wrapped with timers, which gives the extra cost directly, inside the same fit:

- *direct*: Σ controller hook time over the timed window / number of timed steps, divided by the DP-SGD step time
  (the rest of the RLDP fit's step time). Immune to load drift between fits.
- *between fits*: mean step time of the ``rldp`` fit / mean step time of the ``dpsgd`` fit over the same window
  (medians over the repeats). Load drift on the shared cores enters here.

The mean (not the median) step time is what amortises: the decision lands on one step in ten.

Usage::

    .venv/bin/python benchmarks/rldp_overhead.py            # SmolLM2-135M + tiny-llama, writes benchmarks/results/
    .venv/bin/python benchmarks/rldp_overhead.py --quick    # tiny-llama only, short fits, prints only
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import command_line, machine, publish, quiet, train_only_trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
T0 = time.perf_counter()
GOAL = 0.05
COMPONENTS = (
    "hook_batch_start",
    "hook_batch_end",
    "count_release",
    "decision",
    "public_loss",
    "epsilon_queries",
    "replay_add",
    "sac_train",
    "sac_predict",
    "budget_guard",
    "apply_action",
)


def write_dataset(directory: Path, num_examples: int, notes_per_example: int = 3, seed: int = 0) -> Path:
    """``num_examples`` JSON lines, each ``notes_per_example`` pseudo-clinical notes joined (longer than T)."""
    import random

    from dplightning.data import generate_records, render_note

    records = generate_records(num_examples * notes_per_example, seed)
    rng = random.Random(seed)
    notes = [render_note(r, rng) for r in records]
    path = directory / "notes.jsonl"
    with open(path, "w") as f:
        for i in range(num_examples):
            text = "\n\n".join(notes[i * notes_per_example : (i + 1) * notes_per_example])
            f.write(json.dumps({"text": text}) + "\n")
    return path


class Recorder:
    """Per-step wall times and per-step sums of the controller's component timers."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.step = 0  # 1-based index of the optimizer step in progress
        self.t0 = 0.0
        self.step_s: list[float] = []
        self.batch_sizes: list[int] = []
        self.parts: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.decision_steps: list[int] = []

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts[name][self.step] += time.perf_counter() - t

        return wrapper


def make_callbacks(rec: Recorder) -> tuple[Any, Any]:
    import lightning.pytorch as pl

    class StepStart(pl.Callback):
        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int
        ) -> None:
            rec.step += 1
            rec.batch_sizes.append(int(batch["input_ids"].shape[0]))
            rec.t0 = time.perf_counter()

    class StepEnd(pl.Callback):
        def on_train_batch_end(
            self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            rec.step_s.append(time.perf_counter() - rec.t0)
            if len(rec.step_s) >= rec.total_steps:
                trainer.should_stop = True

    return StepStart(), StepEnd()


def instrument(controller: Any, rec: Recorder) -> None:
    """Wrap the controller's hooks and the parts of a decision with timers (instance attributes only)."""
    controller.on_train_batch_start = rec.timed("hook_batch_start", controller.on_train_batch_start)
    controller.on_train_batch_end = rec.timed("hook_batch_end", controller.on_train_batch_end)
    controller._public_loss = rec.timed("public_loss", controller._public_loss)
    controller.apply_action = rec.timed("apply_action", controller.apply_action)
    decide = controller._decide

    def timed_decide(*args: Any, **kwargs: Any) -> Any:
        rec.decision_steps.append(rec.step)
        return rec.timed("decision", decide)(*args, **kwargs)

    controller._decide = timed_decide
    initialise = controller.initialise

    def timed_initialise(strategy: Any) -> None:
        initialise(strategy)
        controller.counts.release = rec.timed("count_release", controller.counts.release)
        controller.guard.safe_sigma = rec.timed("budget_guard", controller.guard.safe_sigma)
        controller.agent.train = rec.timed("sac_train", controller.agent.train)
        controller.agent.predict = rec.timed("sac_predict", controller.agent.predict)
        controller.agent.replay_buffer.add = rec.timed("replay_add", controller.agent.replay_buffer.add)
        strategy.accountant.epsilon = rec.timed("epsilon_queries", strategy.accountant.epsilon)

    controller.initialise = timed_initialise


def clear_accounting_caches() -> int:
    """Empty the accountant's module-level caches (per-σ RDP curves / PLDs). They outlive a fit, so without this
    the second RLDP fit in this process finds the budget guard's σ grid already computed and looks cheaper than a
    fresh run does (tiny-llama: 37 % vs 7 % direct overhead for the first vs the second fit)."""
    from dplightning.privacy import accounting

    cleared = 0
    for value in vars(accounting).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()
            cleared += 1
    return cleared


def run_fit(kind: str, model_name: str, data_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from dplightning.callbacks import RLDPController
    from dplightning.data import TextDataModule
    from dplightning.module import DPLoRAModule
    from dplightning.strategies.dpsgd import DPSGDStrategy

    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(args.threads)
    clear_accounting_caches()  # every fit starts as cold as a fresh process (see clear_accounting_caches)
    total = args.warmup + args.steps
    rec = Recorder(total)
    dm = TextDataModule(
        dataset=str(data_path),
        tokenizer=model_name,
        num_records=0,
        max_length=args.seq_len,
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        public_fraction=0.05,
        data_seed=0,
    )
    module = DPLoRAModule(model_name=model_name, lora_rank=8, lora_alpha=16, learning_rate=2e-3, seed=0)
    strategy = DPSGDStrategy(
        target_epsilon=8.0,
        target_delta=1e-5,
        max_grad_norm=1.0,
        clipping="per_adapter",
        accountant=args.accountant,
        device="cpu",
        seed=0,
    )
    start, end = make_callbacks(rec)
    callbacks: list[Any] = [start]
    controller = None
    if kind == "rldp":
        controller = RLDPController(
            rl_interval=args.rl_interval,
            warmup_steps=0,
            learning_starts=1,
            public_batches=1,
            seed=0,
        )
        instrument(controller, rec)
        callbacks.append(controller)
    callbacks.append(end)
    trainer = train_only_trainer(
        accelerator="cpu", strategy=strategy, max_steps=args.planned_steps, callbacks=callbacks
    )
    t = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t
    assert len(rec.step_s) == total, f"fit stopped after {len(rec.step_s)} of {total} steps"
    lo, hi = args.warmup + 1, total  # timed window, 1-based inclusive
    window = rec.step_s[lo - 1 : hi]
    parts = {name: sum(v for s, v in per.items() if lo <= s <= hi) for name, per in rec.parts.items()}
    hooks = parts.get("hook_batch_start", 0.0) + parts.get("hook_batch_end", 0.0)
    out: dict[str, Any] = {
        "kind": kind,
        "wall_s": wall,
        "window": [lo, hi],
        "mean_step_s": statistics.fmean(window),
        "median_step_s": statistics.median(window),
        "step_s": rec.step_s,
        "batch_sizes": rec.batch_sizes,
        "epsilon_end": strategy.epsilon(),
        "sigma_end": strategy.effective_noise_multiplier,
        "accountant_steps": strategy.accountant.steps,
    }
    if controller is not None:
        out["decision_steps"] = rec.decision_steps
        out["decisions_in_window"] = [s for s in rec.decision_steps if lo <= s <= hi]
        out["controller_s_in_window"] = hooks
        out["components_s_in_window"] = parts
        out["per_decision_s"] = {
            s: {name: per.get(s, 0.0) for name, per in rec.parts.items()} for s in rec.decision_steps
        }
        dp_part = (sum(window) - hooks) / len(window)  # the rest of the step: the DP-SGD step itself
        out["dp_step_within_rldp_fit_s"] = dp_part
        out["direct_overhead"] = hooks / len(window) / dp_part
        out["groups"] = len(strategy.groups)
        out["sac_updates"] = int(getattr(controller.agent, "_n_updates", 0))
    out["threads_after_fit"] = torch.get_num_threads()
    return out


def summarise(fits: list[dict[str, Any]]) -> dict[str, Any]:
    dp = [f for f in fits if f["kind"] == "dpsgd"]
    rl = [f for f in fits if f["kind"] == "rldp"]
    dp_mean = statistics.median(f["mean_step_s"] for f in dp) if dp else None
    rl_mean = statistics.median(f["mean_step_s"] for f in rl) if rl else None
    direct = statistics.median(f["direct_overhead"] for f in rl) if rl else None
    comps: dict[str, float] = {}
    for name in COMPONENTS:
        vals = [
            f["components_s_in_window"].get(name, 0.0) / (f["window"][1] - f["window"][0] + 1) for f in rl
        ]
        comps[name] = statistics.median(vals) if vals else 0.0
    dp_within = statistics.median(f["dp_step_within_rldp_fit_s"] for f in rl) if rl else None
    return {
        "dpsgd_mean_step_s": dp_mean,
        "rldp_mean_step_s": rl_mean,
        "between_fits_overhead": (rl_mean / dp_mean - 1) if dp_mean and rl_mean else None,
        "direct_overhead": direct,
        "dp_step_within_rldp_fit_s": dp_within,
        "controller_per_step_s": {k: v for k, v in comps.items()},
        "goal": GOAL,
        "goal_met_direct": direct is not None and direct <= GOAL,
        "goal_met_between_fits": dp_mean is not None
        and rl_mean is not None
        and rl_mean / dp_mean - 1 <= GOAL,
    }


def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    cfg = result["config"]
    lines = [
        "# RLDP controller overhead per optimizer step (overhead)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m.get('cpu', '?')}, nproc={m['nproc']}, torch {m['torch']} ({m['torch_threads']} thread(s)), "
        f"stable-baselines3 {m.get('stable_baselines3', '—')}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_at_start'])} (shared, noisy cores). Date: {result['date']}. "
        f"Wall time: {result['wall_s']:.0f} s.",
        "",
        f"Setup: Lightning fits, `DPSGDStrategy(target_epsilon=8, per_adapter, accountant={cfg['accountant']})` "
        f"alone vs + `RLDPController(rl_interval={cfg['rl_interval']}, warmup_steps=0, learning_starts=1, "
        f"public_batches=1)`; B={cfg['batch_size']} (Poisson, expected), T={cfg['seq_len']}, public eval batch "
        f"{cfg['batch_size']}, max_steps={cfg['planned_steps']} planned (fits stopped early); fits alternated "
        "dpsgd, rldp, dpsgd, rldp, ... Step time = `on_train_batch_start` → `on_train_batch_end` incl. the "
        "controller's hooks; mean over the timed window (amortises the 1-in-10 decision step). *Direct* = controller "
        "hook time per step / the rest of the step, inside the RLDP fits; *between fits* = RLDP mean step / DP-SGD "
        "mean step − 1. Medians over repeats.",
        "",
        "| model | timed window (steps) | decisions in window | DP-SGD step (s) | RLDP step (s) | controller per step (ms) "
        "| overhead, direct | overhead, between fits | goal ≤ 5 % |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for model, r in result["models"].items():
        s = r["summary"]
        rl = [f for f in r["fits"] if f["kind"] == "rldp"]
        window = rl[0]["window"] if rl else ["?", "?"]
        dec = rl[0]["decisions_in_window"] if rl else []
        ctrl = sum(s["controller_per_step_s"][k] for k in ("hook_batch_start", "hook_batch_end"))
        lines.append(
            f"| {model} | {window[0]}–{window[1]} | {', '.join(map(str, dec))} | {s['dpsgd_mean_step_s']:.3f} | "
            f"{s['rldp_mean_step_s']:.3f} | {ctrl * 1e3:.1f} | {s['direct_overhead'] * 100:.1f} % | "
            f"{s['between_fits_overhead'] * 100:+.1f} % | "
            f"{'met' if s['goal_met_direct'] else 'NOT met'} (direct) |"
        )
    lines += [
        "",
        "Controller cost per optimizer step, by part (ms, amortised over the timed window; parts nest: "
        "`decision` contains public loss, ε queries, replay add, SAC train/predict and apply action, which "
        "contains the budget guard; `hook_batch_end` contains count release and decision):",
        "",
    ]
    names = list(result["models"])
    lines.append("| part | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for comp in COMPONENTS:
        vals = [result["models"][n]["summary"]["controller_per_step_s"].get(comp, 0.0) for n in names]
        shares = [
            v / result["models"][n]["summary"]["dp_step_within_rldp_fit_s"] for v, n in zip(vals, names)
        ]
        lines.append(
            f"| {comp} | "
            + " | ".join(f"{v * 1e3:.2f} ({sh * 100:.2f} %)" for v, sh in zip(vals, shares))
            + " |"
        )
    lines += ["", "Per fit (mean step over the window, s):", ""]
    for model, r in result["models"].items():
        fits = ", ".join(
            f"{f['kind']} {f['mean_step_s']:.3f}"
            + (f" (direct {f['direct_overhead'] * 100:.1f} %)" if f["kind"] == "rldp" else "")
            for f in r["fits"]
        )
        lines.append(f"- {model}: {fits}")
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama only, short fits; prints only")
    parser.add_argument("--models", nargs="+", default=None, help="default: smollm2-135m tiny-llama")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rl-interval", type=int, default=10)
    parser.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")
    parser.add_argument("--planned-steps", type=int, default=1000, help="Trainer max_steps (the plan)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed first steps (default 1 SmolLM2, 10 tiny)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 SmolLM2, 40 tiny)")
    parser.add_argument("--repeats", type=int, default=2, help="(dpsgd, rldp) fit pairs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: 2-thread OpenMP stalls on the shared cores)",
    )
    parser.add_argument("--examples", type=int, default=1000, help="examples in the data file")
    parser.add_argument(
        "--out",
        default=None,
        help="output prefix (default benchmarks/results/rldp_overhead; --quick writes nothing unless given)",
    )
    args = parser.parse_args()
    quiet()
    import torch

    torch.set_num_threads(args.threads)
    models = args.models or (["tiny-llama"] if args.quick else ["smollm2-135m", "tiny-llama"])
    result: dict[str, Any] = {
        "command": command_line("rldp_overhead.py"),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(args.threads, packages=("stable_baselines3",)),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "models")},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="rldp_overhead_") as tmp:
        data_path = write_dataset(Path(tmp), args.examples)
        for model in models:
            small = model.startswith("tiny")
            margs = argparse.Namespace(**vars(args))
            margs.warmup = args.warmup if args.warmup is not None else (10 if small else 1)
            margs.steps = (
                args.steps if args.steps is not None else ((20 if args.quick else 40) if small else 20)
            )
            fits = []
            for rep in range(args.repeats):
                for kind in ("dpsgd", "rldp"):
                    print(
                        f"[{model}] t={time.perf_counter() - T0:.0f}s fit {kind} #{rep + 1} "
                        f"({margs.warmup} + {margs.steps} steps) ...",
                        flush=True,
                    )
                    f = run_fit(kind, model, data_path, margs)
                    msg = f"mean step {f['mean_step_s']:.3f}s"
                    if kind == "rldp":
                        msg += (
                            f", controller {f['controller_s_in_window']:.2f}s in window, direct overhead "
                            f"{f['direct_overhead'] * 100:.2f}%, decisions at {f['decision_steps']}"
                        )
                    print(f"  {msg}", flush=True)
                    fits.append(f)
            result["models"][model] = {
                "warmup": margs.warmup,
                "steps": margs.steps,
                "fits": fits,
                "summary": summarise(fits),
            }
    result["wall_s"] = time.perf_counter() - T0
    result["notes"] = []
    publish(result, to_markdown(result), args.out or (None if args.quick else str(RESULTS / "rldp_overhead")))


if __name__ == "__main__":
    main()
