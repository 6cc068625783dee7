"""CPU throughput (examples/s) of LoRA fine-tuning of SmolLM2-135M: fp32 vs bf16-mixed, max_length padding vs
padding to the longest example, non-private vs DP-SGD; and whether DP-ZO's loss differences survive bf16.

Variants: {non-private LoRA, DP-SGD (:class:`DPSGDStrategy`, flat clipping, σ = 1, C = 1)} × {``32-true``,
``bf16-mixed``} × {``max_length``, ``longest``} padding (:class:`CausalLMCollator`'s ``pad_to``). Every variant
is a real ``Trainer.fit`` (Lightning's precision plugin, the strategy's own hooks, clipping, noise and AdamW
step) on one shared model, so the measured step is the step users run.

Data: to give padding something to skip, examples are the *sentences* of the seeded pseudo-clinical notes
(split at ". " and "; ", eos appended, cut at ``T``): a batch of short records, as from a ``.txt`` file with
one record per line. (The whole notes are all longer than ``T = 32`` tokens, so at that length padding to the
longest note is exactly ``max_length`` padding: the benchmark records that share too.) ``--num-batches`` fixed
batches of ``B`` (Poisson sampling off: every variant sees the same batches in the same order).

Time: side by side in one process, each step its own one-step ``Trainer.fit`` so that variants interleave
step by step. A warm-up step per variant is discarded (oneDNN builds its bf16 kernels per shape on first use;
the first batch's width under one padding is the other batches' width under the other). Then for every
*slot* (round, batch) all variants run that batch back to back, in an order rotated every slot. A step is
``on_train_batch_start`` → ``on_train_batch_end`` (forward, backward, per-example clipping and noise,
optimizer step). Ratios are *paired*: the median over slots of variant time / reference time in the same
slot, so load drift between slots cancels; the JSON also has ratios *of minima* (per batch, the fastest of a
variant's steps: interference only adds time). The 1-minute load average is read next to every step.

DP-ZO: the per-example projected gradients ``(L⁺ − L⁻)/(2μ)`` of :class:`ZerothOrderEstimator` along the same
seeded directions, with the forwards in float32 and under bf16 autocast (what ``bf16-mixed`` does to them),
at μ = 1e-3 (DPZOStrategy's default) and 1e-2 (configs/dpzo.yaml's LoRA setting), LoRA at its initialisation.
Reported: Pearson correlation over all (direction, example) pairs, and over the batch means.

Usage::

    .venv/bin/python benchmarks/throughput.py                 # writes benchmarks/results/throughput.{json,md}
    .venv/bin/python benchmarks/throughput.py --quick         # tiny-llama, seconds, prints only
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

from common import command_line, machine, publish, quiet, train_only_trainer, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("nonprivate", "dpsgd_flat")
PRECISIONS = ("32-true", "bf16-mixed")
PADDINGS = ("max_length", "longest")
SIGMA, CLIP, LR = 1.0, 1.0, 2e-3
T0 = time.perf_counter()


def load1() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------------- data
def sentence_examples(
    model_name: str, seq_len: int, count: int, seed: int = 0
) -> tuple[list[list[int]], dict]:
    """``count`` token id lists: sentences of seeded pseudo-clinical notes, eos appended, cut at ``seq_len``;
    and length statistics (of these sentences and of the whole notes at ``seq_len``)."""
    import random

    from dplightning.data import generate_records, render_note
    from dplightning.models import load_tokenizer

    tok = load_tokenizer(model_name)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    rng = random.Random(seed)
    notes = [render_note(r, rng) for r in generate_records(max(64, count), seed)]
    sentences = [s.strip() for note in notes for s in re.split(r"(?<=[.;])\s+", note) if len(s.strip()) > 1]
    examples = [(tok(s, add_special_tokens=False)["input_ids"] + eos)[:seq_len] for s in sentences[:count]]
    whole = [len(tok(n, add_special_tokens=False)["input_ids"]) + len(eos) for n in notes]
    lengths = [len(e) for e in examples]
    stats = {
        "sentence_tokens_min": min(lengths),
        "sentence_tokens_median": statistics.median(lengths),
        "sentence_tokens_max": max(lengths),
        "whole_notes": len(notes),
        "whole_notes_at_least_T": sum(n >= seq_len for n in whole) / len(whole),
    }
    return examples, stats


def batch_loaders(
    examples: list[list[int]], pad_id: int, seq_len: int, batch_size: int, pad_to: str
) -> list[Any]:
    """One single-batch ``DataLoader`` per batch of ``examples``: a fit of one step runs exactly that batch."""
    from torch.utils.data import DataLoader

    from dplightning.data import CausalLMCollator, TokenizedDataset

    collate = CausalLMCollator(pad_id, seq_len, pad_to=pad_to)  # type: ignore[arg-type]
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    return [
        DataLoader(TokenizedDataset(c), batch_size=batch_size, shuffle=False, collate_fn=collate)
        for c in chunks
    ]


# ----------------------------------------------------------------------------------------------- timing
def best_step_s(steps: list[dict[str, Any]]) -> float:
    """Mean over batches of the fastest step on that batch (``steps``: the JSON records, with their slot):
    interference only ever adds time, so the minimum is the least disturbed sample."""
    batches = sorted({st["slot"][1] for st in steps})
    return statistics.fmean(min(st["seconds"] for st in steps if st["slot"][1] == k) for k in batches)


def make_timer() -> Any:
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        """Wall time, 1-minute load average and padded token count of every training step of a fit."""

        def __init__(self) -> None:
            self.steps: list[tuple[float, float, int]] = []
            self._t0 = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._t0 = time.perf_counter()

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            self.steps.append((time.perf_counter() - self._t0, load1(), int(batch["input_ids"].numel())))

    return StepTimer()


def fit_step(module: Any, variant: tuple[str, str, str], train_loader: Any) -> tuple[float, float, int]:
    """One ``Trainer.fit`` of one step of ``variant`` on ``train_loader``'s batch: (seconds, load, tokens)."""

    from dplightning.strategies import DPSGDStrategy

    method, precision, _ = variant
    strategy: Any = "auto"
    if method == "dpsgd_flat":
        strategy = DPSGDStrategy(
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            clipping="flat",
            poisson_sampling=False,
            device="cpu",
            seed=0,
        )
    timer = make_timer()
    trainer = train_only_trainer(
        accelerator="cpu", devices=1, precision=precision, strategy=strategy, max_steps=1, callbacks=[timer]
    )
    trainer.fit(module, train_dataloaders=train_loader)
    (step,) = timer.steps
    return step


def time_variants(
    model_name: str, seq_len: int, batch_size: int, num_batches: int, rounds: int
) -> dict[str, Any]:
    from dplightning.models import load_tokenizer
    from dplightning.module import DPLoRAModule

    examples, stats = sentence_examples(model_name, seq_len, num_batches * batch_size)
    tok = load_tokenizer(model_name)
    loaders = {p: batch_loaders(examples, tok.pad_token_id, seq_len, batch_size, p) for p in PADDINGS}
    widths = [int(next(iter(dl))["input_ids"].shape[1]) for dl in loaders["longest"]]
    module = DPLoRAModule(model_name=model_name, lora_rank=8, lora_alpha=16, learning_rate=LR, seed=0)
    variants = list(itertools.product(METHODS, PRECISIONS, PADDINGS))
    # Slot = (round, batch): every variant runs that batch once, back to back, so the samples paired below
    # are seconds apart, not a whole round.
    slots = [(r, k) for r in range(rounds) for k in range(num_batches)]
    steps: dict[tuple, list[tuple[float, float, int]]] = {v: [] for v in variants}
    gc.collect()
    gc.freeze()  # a full collection of the survivors costs ~0.5 s: keep the ones during the steps cheap
    # Warm-up: one step per variant on batch 0, discarded. Batch 0's width under one padding is the other
    # batches' width under the other, so afterwards every (method, precision) has met every shape once.
    for v in variants:
        sec, ld, _ = fit_step(module, v, loaders[v[2]][0])
        print(
            f"  t={time.perf_counter() - T0:.0f}s warm-up {'/'.join(v)}: {sec:.2f}s@load{ld:.1f}", flush=True
        )
    for i, (r, k) in enumerate(slots):
        order = variants[i % len(variants) :] + variants[: i % len(variants)]
        for v in order:
            steps[v].append(fit_step(module, v, loaders[v[2]][k]))
        print(
            f"  t={time.perf_counter() - T0:.0f}s round {r} batch {k}: "
            + ", ".join(f"{'/'.join(v)}={steps[v][-1][0]:.2f}s@{steps[v][-1][1]:.1f}" for v in order),
            flush=True,
        )
    gc.unfreeze()

    def paired(v: tuple, ref: tuple) -> float:
        """Median over slots of ``v``'s time / ``ref``'s time in the same slot."""
        return statistics.median(a[0] / b[0] for a, b in zip(steps[v], steps[ref]))

    records = {
        v: [
            {"slot": list(slot), "seconds": s, "load1": ld, "tokens": t}
            for slot, (s, ld, t) in zip(slots, steps[v])
        ]
        for v in variants
    }

    def of_minima(v: tuple, ref: tuple) -> float:
        """``v``'s / ``ref``'s :func:`best_step_s`."""
        return best_step_s(records[v]) / best_step_s(records[ref])

    rows = []
    for v in variants:
        secs = [s for s, _, _ in steps[v]]
        method, precision, padding = v
        fp32, maxlen, nonpriv = (
            (method, "32-true", padding),
            (method, precision, "max_length"),
            ("nonprivate", precision, padding),
        )
        base = (method, "32-true", "max_length")
        rows.append(
            {
                "method": method,
                "precision": precision,
                "padding": padding,
                "median_step_s": statistics.median(secs),
                "min_step_s": min(secs),
                "examples_per_s": batch_size / statistics.median(secs),
                "best_step_s": best_step_s(records[v]),
                "examples_per_s_of_minima": batch_size / best_step_s(records[v]),
                "median_load": statistics.median(ld for _, ld, _ in steps[v]),
                "tokens_per_step": statistics.mean(t for _, _, t in steps[v]),
                "steps": records[v],
                "bf16_speedup": paired(fp32, v) if precision == "bf16-mixed" else None,
                "longest_speedup": paired(maxlen, v) if padding == "longest" else None,
                "speedup_vs_fp32_max_length": paired(base, v),
                "dp_cost_vs_nonprivate": paired(v, nonpriv) if method != "nonprivate" else None,
                "bf16_speedup_of_minima": of_minima(fp32, v) if precision == "bf16-mixed" else None,
                "longest_speedup_of_minima": of_minima(maxlen, v) if padding == "longest" else None,
                "speedup_vs_fp32_max_length_of_minima": of_minima(base, v),
                "dp_cost_of_minima": of_minima(v, nonpriv) if method != "nonprivate" else None,
            }
        )
    return {"rows": rows, "data": {**stats, "batch_widths_longest": widths, "examples": len(examples)}}


# ------------------------------------------------------------------------------------------- DP-ZO check
def dpzo_correlation(
    model_name: str, seq_len: int, batch_size: int, directions: int, mus: tuple[float, ...] = (1e-3, 1e-2)
) -> list[dict[str, Any]]:
    """Correlation of bf16-autocast and float32 projected gradients along the same directions (see docstring)."""
    import random

    import torch

    from dplightning.data import CausalLMCollator, generate_records, render_note
    from dplightning.models import load_tokenizer
    from dplightning.module import DPLoRAModule
    from dplightning.strategies.dpzo import ZerothOrderEstimator, direction_seed

    tok = load_tokenizer(model_name)
    # Whole notes (every one fills T): the regime of a DP-ZO fine-tune of this data.
    rng = random.Random(1)
    notes = [render_note(r, rng) for r in generate_records(batch_size, 1)]
    ids = [(tok(n, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:seq_len] for n in notes]
    batch = CausalLMCollator(tok.pad_token_id, seq_len)([{"input_ids": x} for x in ids])
    module = DPLoRAModule(model_name=model_name, lora_rank=8, lora_alpha=16, seed=0).eval()
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    out = []
    for mu in mus:
        est = ZerothOrderEstimator(module, params, mu=mu)
        fp32, bf16 = [], []
        for k in range(directions):
            seed = direction_seed(0, k, 0)
            fp32.append(est.directional_derivatives(lambda: module.per_example_loss(batch), seed)[0])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16.append(est.directional_derivatives(lambda: module.per_example_loss(batch), seed)[0])
        est.remove()
        a, b = torch.cat(fp32), torch.cat(bf16)
        am, bm = torch.stack([x.mean() for x in fp32]), torch.stack([x.mean() for x in bf16])
        row = {
            "model": model_name,
            "mu": mu,
            "directions": directions,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "per_example_corr": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
            # Over fewer directions a correlation of batch means says nothing.
            "batch_mean_corr": float(torch.corrcoef(torch.stack([am, bm]))[0, 1])
            if directions >= 8
            else None,
            "std_fp32": float(a.std()),
            "std_bf16": float(b.std()),
            "rms_diff_over_std_fp32": float((a - b).pow(2).mean().sqrt() / a.std()),
            "load1": load1(),
        }
        print(
            f"  t={time.perf_counter() - T0:.0f}s DP-ZO {model_name} μ={mu:g}: corr {row['per_example_corr']:.4f} "
            f"(batch means {row['batch_mean_corr']}), load {row['load1']:.1f}",
            flush=True,
        )
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- report
def to_markdown(result: dict[str, Any]) -> str:
    m, cfg, data = result["machine"], result["config"], result["time"]["data"]
    loads = [s["load1"] for r in result["time"]["rows"] for s in r["steps"]]
    lines = [
        "# Training throughput: fp32 vs bf16-mixed, padding, non-private vs DP-SGD",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m.get('cpu', '?')}, nproc={m['nproc']}, torch {m['torch']}, {cfg['threads']} torch threads, "
        f"bf16 fast here: {result['bf16_is_fast']} (CPU flags {', '.join(result['bf16_flags']) or 'none'}). "
        f"**Shared machine**: other engineers' jobs ran at the same time; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_at_start'])}, during the timed steps "
        f"{min(loads):.1f}–{max(loads):.1f} (median {statistics.median(loads):.1f}) on {m['nproc']} cores. "
        "Absolute times are inflated and noisy; the ratios are paired side by side (see below). "
        f"Date: {result['date']}. Wall time: {result['wall_s']:.0f} s.",
        "",
        f"{cfg['model']}, LoRA r=8 on q_proj/v_proj, AdamW, B={cfg['batch_size']}, T={cfg['seq_len']}, "
        f"{cfg['num_batches']} fixed batches, one warm-up step per variant, then {cfg['rounds']} rounds × "
        f"{cfg['num_batches']} batches = {cfg['rounds'] * cfg['num_batches']} slots, each running every variant's step "
        "on that batch back to back (one-step `Trainer.fit` each, order rotated). DP-SGD = `DPSGDStrategy(clipping=flat, "
        f"noise_multiplier={SIGMA}, max_grad_norm={CLIP}, poisson_sampling=False)`. Examples: sentences of the "
        f"pseudo-clinical notes, {data['sentence_tokens_min']}–{data['sentence_tokens_max']} tokens (median "
        f"{data['sentence_tokens_median']}); padded to the longest, the batches are "
        f"{', '.join(map(str, data['batch_widths_longest']))} wide instead of {cfg['seq_len']}. Whole notes: "
        f"{data['whole_notes_at_least_T']:.0%} of {data['whole_notes']} are ≥ {cfg['seq_len']} tokens, so at this "
        "T padding to the longest note changes nothing for them.",
        "",
        "Ratios are speed-ups (> 1 = faster): the median over slots of reference step time / variant step time in "
        "the same slot; in brackets the same ratio of minima (per batch, each variant's fastest step; *examples/s "
        "(minima)* is B over the mean of those). *DP cost* is DP-SGD time / non-private time (same precision and "
        "padding).",
        "",
        "| method | precision | padding | median step (s) | examples/s (median) | examples/s (minima) | "
        "median load | bf16 speed-up | longest-padding speed-up | × fp32 + max_length | DP cost |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x: Any, y: Any = None) -> str:
        if x is None:
            return "—"
        return f"{x:.2f}" + ("" if y is None else f" ({y:.2f})")

    for r in result["time"]["rows"]:
        lines.append(
            f"| {r['method']} | {r['precision']} | {r['padding']} | {r['median_step_s']:.2f} | "
            f"{r['examples_per_s']:.2f} | {r['examples_per_s_of_minima']:.2f} | {r['median_load']:.1f} | {f(r['bf16_speedup'], r['bf16_speedup_of_minima'])} | "
            f"{f(r['longest_speedup'], r['longest_speedup_of_minima'])} | "
            f"{f(r['speedup_vs_fp32_max_length'], r['speedup_vs_fp32_max_length_of_minima'])} | "
            f"{f(r['dp_cost_vs_nonprivate'], r['dp_cost_of_minima'])} |"
        )
    zo = result.get("dpzo") or []
    if zo:
        lines += [
            "",
            "## DP-ZO under bf16: projected gradients (L⁺ − L⁻)/(2μ), bf16 autocast vs float32",
            "",
            "Same directions, same batch (whole notes cut at T), LoRA at initialisation. Correlation ≥ 0.9 is the bar "
            "for running DP-ZO's forwards in bf16.",
            "",
            "| model | μ | directions × B | corr (per example) | corr (batch means) | std fp32 | std bf16 | "
            "rms(bf16 − fp32) / std fp32 | load |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for z in zo:
            lines.append(
                f"| {z['model']} | {z['mu']:g} | {z['directions']} × {z['batch_size']} | {z['per_example_corr']:.3f} | "
                f"{f(z['batch_mean_corr'])} | {z['std_fp32']:.3f} | {z['std_bf16']:.3f} | "
                f"{z['rms_diff_over_std_fp32']:.2f} | {z['load1']:.1f} |"
            )
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama, few steps, prints only")
    parser.add_argument("--model", default=None, help="default smollm2-135m (tiny-llama with --quick)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--num-batches", type=int, default=2, help="fixed batches")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds over the batches")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--zo-models", nargs="*", default=None, help="default: tiny-llama and the timed model"
    )
    parser.add_argument("--zo-directions", type=int, default=None, help="default 32 tiny, 4 SmolLM2")
    parser.add_argument("--zo-batch-size", type=int, default=8)
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite <out>.md (and the notes in <out>.json) from <out>.json, no measuring",
    )
    parser.add_argument("--note", action="append", default=[], help="a note for the report (repeatable)")
    parser.add_argument(
        "--out",
        default=None,
        help="output prefix (default benchmarks/results/throughput; --quick writes nothing unless given)",
    )
    args = parser.parse_args(argv)
    if args.render:
        import json

        prefix = args.out or str(RESULTS / "throughput")
        result = json.loads(Path(prefix + ".json").read_text())
        for row in result["time"]["rows"]:  # figures added after a result was written are derived here
            row.setdefault("best_step_s", best_step_s(row["steps"]))
            row.setdefault("examples_per_s_of_minima", result["config"]["batch_size"] / row["best_step_s"])
        result["notes"] = [*result.get("notes", []), *args.note]
        write_results(prefix, result, to_markdown(result))
        print(f"rewrote {prefix}.md")
        return 0
    quiet()
    import torch

    from dplightning.hardware import BF16_CPU_FLAGS, bf16_is_fast, cpu_flags

    torch.set_num_threads(args.threads)
    model = args.model or ("tiny-llama" if args.quick else "smollm2-135m")
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "command": command_line("throughput.py", argv),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(threads=args.threads, packages=("lightning", "peft", "transformers")),
        "bf16_is_fast": bf16_is_fast("cpu"),
        "bf16_flags": [f for f in BF16_CPU_FLAGS if f in cpu_flags()],
        "config": {
            "model": model,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "num_batches": args.num_batches,
            "rounds": 1 if args.quick else args.rounds,
            "threads": args.threads,
            "sigma": SIGMA,
            "max_grad_norm": CLIP,
            "lr": LR,
        },
    }
    cfg = result["config"]
    print(
        f"[throughput] {model} B={cfg['batch_size']} T={cfg['seq_len']} threads={args.threads} "
        f"load={load1():.1f}",
        flush=True,
    )
    result["time"] = time_variants(model, args.seq_len, args.batch_size, args.num_batches, cfg["rounds"])
    zo_models = args.zo_models if args.zo_models is not None else list(dict.fromkeys(["tiny-llama", model]))
    result["dpzo"] = []
    for zm in zo_models:
        dirs = args.zo_directions or (32 if zm.startswith("tiny") else 4)
        result["dpzo"] += dpzo_correlation(zm, args.seq_len, args.zo_batch_size, 4 if args.quick else dirs)
    result["wall_s"] = time.perf_counter() - t_start
    result["notes"] = list(args.note)
    publish(result, to_markdown(result), args.out or (None if args.quick else str(RESULTS / "throughput")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
