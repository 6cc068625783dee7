"""Speed and peak memory of one DP-SGD step vs one non-private LoRA step vs Opacus (speed and memory).

Every variant trains LoRA (r=8, alpha=16, on ``q_proj``/``v_proj``) of :class:`DPLoRAModule` with AdamW on the
*same* fixed batches of ``B x T`` tokens: pseudo-clinical notes from :class:`TextDataModule`, tokenised, concatenated
and cut into rows of exactly ``T`` tokens (no padding), collated by the data module's own collate function.

Variants (one step = everything from ``zero_grad`` to ``optimizer.step``):

- ``nonprivate``: forward, mean loss, backward, AdamW step.
- ``dp_flat`` / ``dp_per_layer`` / ``dp_per_adapter``: the step of :class:`DPSGDStrategy`, built from the library
  pieces and the strategy object itself (no Lightning ``Trainer``, so the variants can be interleaved step by step
  in one process): :class:`PerExampleGradients` hooks on the module; forward + mean loss + backward; then
  ``DPSGDMixin.backward``'s post-processing, the strategy's own code (``engine.pop()`` -> ``_add_clipped``:
  :func:`clip_to_grid_and_sum` over :func:`make_groups` groups, sums and norms kept on the strategy); then the
  strategy's own ``release_noisy_gradient()`` (budget check, Gaussian noise from its :class:`NoiseSource` per group,
  ``/ expected batch size``, noisy-norm bookkeeping, accountant step); then AdamW's step. sigma = 1, C = 1.
- ``opacus_flat``: reference. Opacus ``GradSampleModule`` (hooks mode) around the peft model + Opacus
  ``DPOptimizer`` (flat per-sample clipping, Gaussian noise, / expected batch size) wrapping AdamW. sigma = 1, C = 1.

Precision (``--precisions``, default ``32-true bf16-mixed``): every variant is timed under each, as Lightning's
``Trainer(precision=...)`` runs it: the step's forward and loss run inside the forward context of the precision
plugin the Trainer builds (``32-true``: :class:`~lightning.pytorch.plugins.precision.Precision`, no autocast;
``bf16-mixed``: :class:`~lightning.pytorch.plugins.precision.MixedPrecision`, i.e.
``torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)``), while backward, the hooks' per-example
gradients, clipping, sums, noise and AdamW run outside it, as in ``Trainer.fit``. Under bf16-mixed the hooks'
per-example LoRA gradients come out in bf16 (the dtype of the backward's activations and output gradients); the
strategy's clipping reads them into float64 blocks, sums on the integer grid and adds the noise there, and the
released gradient is float32, whatever the forward's precision. Both precisions of a variant share its model and
optimizer (the weights stay float32; only the forward's matmuls change dtype).

Time: all (variant, precision) pairs live in one process (one model copy per variant) and are run interleaved,
round-robin with the order rotated every round; ``--warmup`` rounds are discarded, then the median over ``--steps``
rounds is reported, with the median of the per-round ratios to the non-private step of the same precision and
round (robust to load drift). The bf16 speed-up of a variant is the median over rounds of its 32-true step / its
bf16-mixed step of the same round; the DP cost under a precision is that paired ratio of the DP variant to the
non-private step. For the DP variants the time spent in the strategy's two parts is kept too (median over the
timed rounds): ``_add_clipped`` (per-example norms, clipping onto the integer grid, sums) and
``release_noisy_gradient`` (discrete Gaussian noise per coordinate, budget check, accountant step). The 1-minute
load average is read after every timed round and reported (median and range).
Memory is measured under the first precision given that is ``32-true`` (else the first given).

Memory: each variant is run again in a fresh process (forked from a ``forkserver`` that has only imported the
libraries, one variant per process): build model + batches, ``malloc_trim``, reset the peak-RSS
counter (``/proc/self/clear_refs``), run ``--mem-steps`` steps cold. Reported: the process peak RSS
(``ru_maxrss``: interpreter, libraries, model and the steps; read before the reset and after the steps, since
``clear_refs`` resets it too; cross-checked against ``VmHWM``) and the step peak above the pre-step RSS (``VmHWM``
after the reset minus ``VmRSS`` before); both as ratios to the non-private process. Why a forkserver and not
``subprocess``: an exec'd child's ``ru_maxrss`` starts at the RSS its parent had when it forked (Linux keeps the
pre-exec high-water mark), so children of the ~500 MB timing process all reported ~500 MB. On CUDA,
``max_memory_allocated`` after ``reset_peak_memory_stats``.

Threads: ``--threads 1`` by default. On the shared 2-core machine torch's 2-thread OpenMP regions stall whenever the
other engineers' processes hold a core (tiny-llama: 57 ms/step with 1 thread vs 506 ms with 2 at load average 8;
SmolLM2: 14 s vs 33 s), which buries the ratios in noise. ``--threads 2`` measures the 2-thread setting.

Usage::

    .venv/bin/python benchmarks/dpsgd_overhead.py            # SmolLM2-135M + tiny-llama, writes benchmarks/results/
    .venv/bin/python benchmarks/dpsgd_overhead.py --quick    # tiny-llama only, few steps (< 1 min), prints only
    .venv/bin/python benchmarks/dpsgd_overhead.py --models smollm2-135m --steps 20 --threads 2
    .venv/bin/python benchmarks/dpsgd_overhead.py --precisions 32-true --variants nonprivate dp_flat
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import gc
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine, publish, quiet, status_kb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("nonprivate", "dp_flat", "dp_per_layer", "dp_per_adapter", "opacus_flat")
DP_VARIANTS = ("dp_flat", "dp_per_layer", "dp_per_adapter")
PRECISIONS = ("32-true", "bf16-mixed")
NUM_BATCHES = 4  # distinct fixed batches, cycled
SIGMA, CLIP, LR = 1.0, 1.0, 2e-3
GOAL_TIME, GOAL_MEM = 1.05, 1.10
T0 = time.perf_counter()


# ---------------------------------------------------------------------------------------------- helpers
def make_batches(model_name: str, batch_size: int, seq_len: int, device: Any) -> list[dict[str, Any]]:
    """``NUM_BATCHES`` batches ``[B, T]`` of real text tokens, no padding (rows of exactly ``T`` tokens)."""
    from dplightning.data import TextDataModule

    need = NUM_BATCHES * batch_size * seq_len
    records = 100
    while True:
        dm = TextDataModule(
            tokenizer=model_name, num_records=records, max_length=seq_len, batch_size=batch_size, data_seed=0
        )
        dm.setup()
        stream = [tok for item in dm.train_dataset for tok in item["input_ids"]]  # type: ignore[union-attr]
        if len(stream) >= need:
            break
        records *= 2
    rows = [{"input_ids": stream[i * seq_len : (i + 1) * seq_len]} for i in range(NUM_BATCHES * batch_size)]
    assert dm.collate_fn is not None
    batches = [dm.collate_fn(rows[k * batch_size : (k + 1) * batch_size]) for k in range(NUM_BATCHES)]
    for b in batches:
        assert tuple(b["input_ids"].shape) == (batch_size, seq_len) and bool(b["attention_mask"].all())
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def precision_plugin(precision: str, device: Any) -> Any:
    """The precision plugin ``Trainer(precision=precision)`` builds on ``device`` (Lightning's accelerator
    connector: ``MixedPrecision(precision, "cpu" | "cuda")`` for mixed precision, plain ``Precision`` for
    ``32-true``). Its ``forward_context()`` is what ``Trainer.fit`` wraps each ``training_step`` in."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    if precision == "32-true":
        return Precision()
    if precision == "bf16-mixed":
        return MixedPrecision("bf16-mixed", "cuda" if str(device).startswith("cuda") else "cpu")
    raise ValueError(f"unknown precision {precision}")


# step(batch, precision plugin) -> seconds spent in the strategy's own parts of the step (DP variants), else None
Step = Callable[[dict, Any], "dict[str, float] | None"]


def build_variant(variant: str, model_name: str, batch_size: int, device: Any) -> tuple[Step, dict, Any]:
    """A fresh model + optimizer for ``variant``, its step function ``step(batch, plugin)`` (forward and loss in
    ``plugin.forward_context()``, everything after it outside, as in ``Trainer.fit``) and the module."""
    import torch

    from dplightning.module import DPLoRAModule

    module = DPLoRAModule(model_name=model_name, lora_rank=8, lora_alpha=16, learning_rate=LR, seed=0).to(
        device
    )
    module.train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    info: dict[str, Any] = {"trainable_params": sum(p.numel() for p in trainable)}

    if variant == "nonprivate":
        opt = torch.optim.AdamW(trainable, lr=LR)

        def step(batch: dict, plugin: Any) -> None:
            opt.zero_grad(set_to_none=True)
            # == Strategy.training_step's `with precision_plugin.train_step_context()` (= forward_context):
            with plugin.forward_context():
                loss = module.per_example_loss(batch).mean()
            loss.backward()
            opt.step()
            return None

        return step, info, module

    if variant in DP_VARIANTS:
        from dplightning.privacy.clipping import make_groups
        from dplightning.privacy.per_example_grads import PerExampleGradients
        from dplightning.strategies.dpsgd import DPSGDStrategy

        mode = variant.removeprefix("dp_")
        strategy = DPSGDStrategy(
            noise_multiplier=SIGMA, max_grad_norm=CLIP, clipping=mode, device=device, seed=0
        )  # type: ignore[arg-type]
        # == DPSGDMixin.setup (minus the Trainer checks) and process_dataloader's q, N, qN.
        engine = PerExampleGradients(module, "mean")
        strategy._engine = engine
        strategy._params = dict(module.named_parameters())
        strategy._trainable = set(engine.param_names)
        strategy.groups = make_groups(engine.param_names, mode)  # type: ignore[arg-type]
        strategy.clip_thresholds = dict.fromkeys(strategy.groups, CLIP / math.sqrt(len(strategy.groups)))
        strategy.set_noise_multiplier(SIGMA)
        strategy.num_examples = 1000
        strategy.sample_rate = batch_size / strategy.num_examples
        strategy.expected_batch_size = float(batch_size)
        info["groups"] = len(strategy.groups)
        opt = torch.optim.AdamW(trainable, lr=LR)

        def step(batch: dict, plugin: Any) -> dict[str, float]:
            opt.zero_grad(set_to_none=True)
            # == Strategy.training_step's `with precision_plugin.train_step_context()` (= forward_context):
            with plugin.forward_context():
                loss = module.per_example_loss(batch).mean()
            loss.backward()
            t0 = time.perf_counter()
            # == DPSGDMixin.backward after super().backward(), outside autocast:
            strategy._add_clipped(engine.pop())
            t1 = time.perf_counter()
            # == DPSGDMixin.optimizer_step's private closure, then the optimizer step:
            strategy.release_noisy_gradient()
            t2 = time.perf_counter()
            opt.step()
            return {"clip_s": t1 - t0, "release_s": t2 - t1}

        return step, info, module

    if variant == "opacus_flat":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        # Wrap the peft model: hooks go on its trainable leaves (the lora_A/lora_B nn.Linear). module.model stays
        # the same object, so per_example_loss runs through the hooked layers.
        gsm = GradSampleModule(module.model, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(
            torch.optim.AdamW(trainable, lr=LR),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=batch_size,
            loss_reduction="mean",
        )
        info["opacus_wrapped"] = type(gsm).__name__

        def step(batch: dict, plugin: Any) -> None:
            opt.zero_grad(set_to_none=True)
            with plugin.forward_context():
                loss = module.per_example_loss(batch).mean()
            loss.backward()
            opt.step()
            return None

        return step, info, module

    raise ValueError(f"unknown variant {variant}")


def _sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- timing
def _key(variant: str, precision: str) -> str:
    return f"{variant}@{precision}"


def time_variants(
    model_name: str,
    variants: list[str],
    batch_size: int,
    seq_len: int,
    warmup: int,
    steps: int,
    device: Any,
    precisions: list[str] | tuple[str, ...] = ("32-true",),
) -> dict[str, Any]:
    """Median step time of every (variant, precision), interleaved round-robin in this process (see docstring).

    Returns ``by_precision[precision][variant]`` rows (times, and the paired ratio to the non-private step of the
    same precision; for DP variants also ``median_clip_s``, the strategy's ``_add_clipped``, and
    ``median_release_s``, its ``release_noisy_gradient``), ``errors`` keyed ``variant@precision``, and the load
    average read after each timed round.
    """
    batches = make_batches(model_name, batch_size, seq_len, device)
    plugins = {p: precision_plugin(p, device) for p in precisions}
    built: dict[str, Step] = {}
    infos: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for v in variants:
        try:
            built[v], infos[v], _ = build_variant(v, model_name, batch_size, device)
        except Exception as exc:  # e.g. an Opacus incompatibility: report it, keep the others
            for p in precisions:
                errors[_key(v, p)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    names = [(v, p) for p in precisions for v in variants if v in built]
    times: dict[tuple[str, str], list[float]] = {n: [] for n in names}
    warm: dict[tuple[str, str], list[float]] = {n: [] for n in names}
    parts: dict[tuple[str, str], dict[str, list[float]]] = {n: {} for n in names}
    loads: list[float] = []
    # A full gc.collect() costs ~0.5 s with torch + transformers + lightning loaded: do it once and freeze the
    # survivors, so the collections that still happen during the steps are cheap and alike for every variant.
    gc.collect()
    gc.freeze()
    for r in range(warmup + steps):
        order = names[r % len(names) :] + names[: r % len(names)]
        batch = batches[r % NUM_BATCHES]
        for n in order:
            v, p = n
            _sync(device)
            t0 = time.perf_counter()
            try:
                part = built[v](batch, plugins[p])
            except Exception as exc:
                errors[_key(v, p)] = f"{type(exc).__name__} in step: {str(exc).splitlines()[0][:300]}"
                names.remove(n)
                continue
            _sync(device)
            (warm if r < warmup else times)[n].append(time.perf_counter() - t0)
            if r >= warmup:
                for k, x in (part or {}).items():
                    parts[n].setdefault(k, []).append(x)
        if r >= warmup:
            loads.append(os.getloadavg()[0])
        print(
            f"  [{model_name}] round {r + 1}/{warmup + steps}" + (" (warm-up)" if r < warmup else ""),
            " ".join(
                f"{_key(*n)}={(warm if r < warmup else times)[n][-1] * 1e3:.0f}ms"
                for n in order
                if n in names
            ),
            f"load={os.getloadavg()[0]:.1f}",
            flush=True,
        )
    out: dict[str, Any] = {
        "precisions": list(precisions),
        "by_precision": {p: {} for p in precisions},
        "errors": errors,
        "loadavg_1min_during": {
            "median": statistics.median(loads) if loads else None,
            "min": min(loads, default=None),
            "max": max(loads, default=None),
            "per_round": loads,
        },
    }
    for p in precisions:
        base = times.get(("nonprivate", p)) if ("nonprivate", p) in names else None
        for v in variants:
            if (v, p) not in names:
                continue
            ts = times[(v, p)]
            row: dict[str, Any] = {
                "precision": p,
                "median_s": statistics.median(ts),
                "mean_s": statistics.fmean(ts),
                "min_s": min(ts),
                "steps_s": ts,
                "warmup_s": warm[(v, p)],
                **{f"median_{k}": statistics.median(xs) for k, xs in parts[(v, p)].items()},
                **infos[v],
            }
            if base:
                row["ratio_of_medians"] = row["median_s"] / statistics.median(base)
                row["median_paired_ratio"] = statistics.median(t / b for t, b in zip(ts, base))
            out["by_precision"][p][v] = row
    del built
    gc.unfreeze()
    gc.collect()
    return out


def precision_summary(timing: dict[str, Any], reference: str = "32-true") -> dict[str, Any]:
    """Per variant, for every precision but ``reference``: its speed-up over ``reference`` (paired: median over
    rounds of reference step / this precision's step of the same round; and of the medians) and the DP cost
    (paired DP / non-private) under both precisions."""
    by = timing["by_precision"]
    out: dict[str, Any] = {}
    if reference not in by:
        return out
    for p, rows in by.items():
        if p == reference:
            continue
        per: dict[str, Any] = {}
        for v, row in rows.items():
            ref = by[reference].get(v)
            if ref is None:
                continue
            n = min(len(ref["steps_s"]), len(row["steps_s"]))
            per[v] = {
                "speedup_paired": statistics.median(
                    a / b for a, b in zip(ref["steps_s"][:n], row["steps_s"][:n])
                ),
                "speedup_of_medians": ref["median_s"] / row["median_s"],
                f"dp_cost_{reference}": ref.get("median_paired_ratio") if v != "nonprivate" else None,
                f"dp_cost_{p}": row.get("median_paired_ratio") if v != "nonprivate" else None,
            }
        out[p] = per
    return out


# ----------------------------------------------------------------------------------------------- memory
def mem_child(
    model_name: str, variant: str, batch_size: int, seq_len: int, steps: int, precision: str = "32-true"
) -> dict[str, Any]:
    """Runs in a fresh process: peak memory of ``steps`` cold steps of ``variant`` under ``precision``."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batches = make_batches(model_name, batch_size, seq_len, device)
    step, info, _ = build_variant(variant, model_name, batch_size, device)
    plugin = precision_plugin(precision, device)
    gc.collect()
    res: dict[str, Any] = {
        "variant": variant,
        "precision": precision,
        "steps": steps,
        "device": str(device),
        **info,
    }
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        # /proc/self/clear_refs below resets ru_maxrss as well as VmHWM: read both before and after.
        res["ru_maxrss_before_steps_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res["setup_peak_mb"] = status_kb("VmHWM") / 1024  # peak of imports + model + batches
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = status_kb("VmRSS") / 1024
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % NUM_BATCHES], plugin)
    _sync(device)
    res["seconds"] = time.perf_counter() - t0
    res["base_mb"] = base
    if cuda:
        res["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["step_peak_mb"] = res["peak_mb"] - base
    else:
        hwm = status_kb("VmHWM") / 1024
        res["step_peak_mb"] = hwm - base
        res["ru_maxrss_after_steps_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res["process_peak_mb"] = max(res["ru_maxrss_before_steps_mb"], res["ru_maxrss_after_steps_mb"])
        res["process_peak_vmhwm_mb"] = max(res["setup_peak_mb"], hwm)
    return res


def start_forkserver() -> Any:
    """The forkserver that memory processes fork from; imports the libraries once (started early by ``main`` so
    this overlaps the timing process's own imports)."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        [
            "torch",
            "transformers",
            "peft",
            "lightning.pytorch",
            "dplightning.module",
            "dplightning.data",
            "dplightning.strategies.dpsgd",
            "opacus",
        ]
    )
    forkserver.ensure_running()
    return ctx


def _mem_task(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    quiet()
    torch.set_num_threads(spec["threads"])
    try:
        return mem_child(
            spec["model"],
            spec["variant"],
            spec["batch_size"],
            spec["seq_len"],
            spec["steps"],
            spec["precision"],
        )
    except Exception as exc:  # reported in the table, the other variants go on
        return {
            "variant": spec["variant"],
            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
        }


def measure_memory(
    model_name: str,
    variants: list[str],
    batch_size: int,
    seq_len: int,
    steps: int,
    threads: int,
    jobs: int,
    precision: str = "32-true",
) -> dict[str, Any]:
    """One fresh process per variant, ``jobs`` at a time (peaks are per process, so they do not interact).

    Processes come from a ``forkserver`` that has only imported the libraries (no model, no tensors, no OpenMP pool
    started): each child is a clean process that skips the ~10 s of imports. ``maxtasksperchild=1``: one variant
    per process.
    """
    ctx = start_forkserver()
    specs = [
        {
            "model": model_name,
            "variant": v,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "steps": steps,
            "threads": threads,
            "precision": precision,
        }
        for v in variants
    ]
    with ctx.Pool(processes=jobs, maxtasksperchild=1) as pool:
        rows = pool.map(_mem_task, specs, chunksize=1)
    out = {v: row for v, row in zip(variants, rows)}
    for v, row in out.items():
        print(f"  [{model_name}] memory {v}: {row}", flush=True)
    base = out.get("nonprivate", {})
    for row in out.values():
        if "error" in row or "error" in base:
            continue
        for key in ("process_peak_mb", "peak_mb", "step_peak_mb"):
            if key in row and base.get(key):
                row[key.replace("_mb", "_ratio")] = row[key] / base[key]
    return out


# ---------------------------------------------------------------------------------------------- reports
def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.1f}"


def primary_precision(precisions: list[str] | tuple[str, ...]) -> str:
    """The precision of the main table, the memory processes and the goals: ``32-true`` if timed, else the first."""
    return "32-true" if "32-true" in precisions else precisions[0]


def _load_text(load: dict[str, Any]) -> str:
    if load.get("median") is None:
        return "—"
    return f"{load['median']:.1f} (range {load['min']:.1f}–{load['max']:.1f})"


def _precision_table(r: dict[str, Any]) -> list[str]:
    """bf16 speed-up per variant and DP cost under each precision (see :func:`precision_summary`)."""
    t = r["time"]
    ref = "32-true"
    lines: list[str] = []
    for p, per in r.get("precision", {}).items():
        if not per:
            continue
        lines += [
            "",
            f"{p} vs {ref} (same process and rounds; *speed-up* = median over rounds of the {ref} step / the {p} "
            f"step of the same variant in the same round, in brackets the ratio of the medians; *DP cost* = paired "
            f"DP / non-private under that precision):",
            "",
            f"| variant | {ref} median step (ms) | {p} median step (ms) | {p} speed-up (paired) | "
            f"DP cost {ref} | DP cost {p} | clip + sum (ms), {ref} / {p} | noise + release (ms), {ref} / {p} |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v in VARIANTS:
            if v not in per:
                continue
            s = per[v]
            a, b = t["by_precision"][ref][v], t["by_precision"][p][v]
            part = {
                k: f"{_ms(a.get(k))} / {_ms(b.get(k))}" if k in a or k in b else "—"
                for k in ("median_clip_s", "median_release_s")
            }
            lines.append(
                f"| {v} | {a['median_s'] * 1e3:.1f} | {b['median_s'] * 1e3:.1f} | {s['speedup_paired']:.2f} "
                f"({s['speedup_of_medians']:.2f}) | {_f(s[f'dp_cost_{ref}'], '{:.3f}')} | "
                f"{_f(s[f'dp_cost_{p}'], '{:.3f}')} | {part['median_clip_s']} | {part['median_release_s']} |"
            )
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# DP-SGD step overhead (speed and memory)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m.get('cpu', '?')}, nproc={m['nproc']}, torch {m['torch']} ({m['torch_threads']} threads), "
        f"opacus {m.get('opacus', '—')}, peft {m.get('peft', '—')}, CUDA: {m['cuda'] or 'none'}; "
        f"load average at start {', '.join(f'{x:.1f}' for x in m['loadavg_at_start'])} (shared, noisy cores). "
        f"Date: {result['date']}. Wall time: {result['wall_s']:.0f} s.",
        "",
        "Step = `zero_grad` → forward → mean loss → backward → [per-example clip + noise] → AdamW step, LoRA r=8 on "
        "q_proj/v_proj, same fixed batches for every variant. DP variants run `DPSGDStrategy`'s own step code "
        "(hooks, `clip_to_grid_and_sum`, `release_noisy_gradient`) without a Trainer; see the script docstring. "
        "Precision: forward and loss inside the forward context of the precision plugin `Trainer(precision=...)` "
        'builds (`bf16-mixed`: `torch.autocast("cpu", dtype=torch.bfloat16)`), backward, per-example '
        "gradients, clipping, noise and AdamW outside it, as in `Trainer.fit`; weights stay float32 (under bf16 "
        "the hooks' per-example gradients are bf16, clipped in float64 blocks onto the integer grid). "
        "Time: every (variant, precision) interleaved round-robin in one process, median over the timed rounds; "
        "*paired* = median over rounds of (variant / non-private of the same precision and round). Memory (main "
        "table's precision only): a fresh process per variant (forked from a "
        "forkserver that only imported the libraries); *process peak* = `ru_maxrss` (Python, libraries, model, "
        "batches and the steps), *step peak* = peak RSS (`VmHWM`) during the steps above the pre-step RSS.",
        "",
    ]
    for model, r in result["models"].items():
        cfg = r["config"]
        primary = r["time"]["primary_precision"]
        variants = r["time"]["by_precision"].get(primary, {})
        lines += [
            f"## {model} (B={cfg['batch_size']}, T={cfg['seq_len']}, {cfg['warmup']} warm-up + {cfg['steps']} timed "
            f"rounds, memory over {cfg['mem_steps']} cold steps)",
            "",
            f"1-minute load average during the timed rounds: {_load_text(r['time']['loadavg_1min_during'])}.",
            "",
            f"Precision {primary}:",
            "",
            "| variant | median step (ms) | × non-private (medians) | × non-private (paired) | process peak RSS (MB) "
            "| × | step peak (MB) | × |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v in VARIANTS:
            t = variants.get(v)
            mem = r["memory"].get(v, {})
            err = r["time"]["errors"].get(_key(v, primary))
            if t is None and err is None:
                continue
            if t is None:
                lines.append(f"| {v} | failed: {err} | | | | | | |")
                continue
            peak_key = "peak_mb" if "peak_mb" in mem else "process_peak_mb"
            peak_ratio_key = peak_key.replace("_mb", "_ratio")
            lines.append(
                f"| {v} | {t['median_s'] * 1e3:.1f} | {_f(t.get('ratio_of_medians'), '{:.3f}')} | "
                f"{_f(t.get('median_paired_ratio'), '{:.3f}')} | {_f(mem.get(peak_key), '{:.0f}')} | "
                f"{_f(mem.get(peak_ratio_key), '{:.3f}')} | {_f(mem.get('step_peak_mb'), '{:.0f}')} | "
                f"{_f(mem.get('step_peak_ratio'), '{:.3f}')} |"
            )
        lines += _precision_table(r)
        if r["time"]["errors"]:
            lines += ["", "Errors: " + "; ".join(f"`{k}`: {v}" for k, v in r["time"]["errors"].items())]
        lines += [
            "",
            f"Goals ({primary}; DP step ≤ 1.05× non-private time, ≤ 1.10× peak memory, faster than Opacus):",
            "",
        ]
        for g in r["goals"]:
            lines.append(
                f"- `{g['variant']}`: time {_f(g['time_ratio'], '{:.3f}')}× → {'met' if g['time_ok'] else 'NOT met'}; "
                f"process peak {_f(g['mem_ratio'], '{:.3f}')}× → {'met' if g['mem_ok'] else 'NOT met'} "
                f"(step peak {_f(g['step_mem_ratio'], '{:.3f}')}×); vs Opacus "
                f"{_f(g['vs_opacus'], '{:.2f}')}× → {'faster' if g['faster_than_opacus'] else 'NOT faster' if g['vs_opacus'] else 'n/a'}"
            )
        lines.append("")
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def model_result(cfg: dict[str, Any], timing: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any]:
    """One model's entry of the results: its configuration, timing (with the main precision), memory, the
    precision summary (:func:`precision_summary`) and the goals."""
    timing["primary_precision"] = primary_precision(timing["precisions"])
    r = {"config": cfg, "time": timing, "memory": memory, "precision": precision_summary(timing)}
    r["goals"] = goals(r)
    return r


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals, judged under the main table's precision (``32-true`` when it was timed)."""
    out = []
    tv, mem = r["time"]["by_precision"].get(r["time"]["primary_precision"], {}), r["memory"]
    op = tv.get("opacus_flat")
    for v in DP_VARIANTS:
        if v not in tv:
            continue
        tr = tv[v].get("median_paired_ratio")
        mr = mem.get(v, {}).get("peak_ratio", mem.get(v, {}).get("process_peak_ratio"))
        vs = tv[v]["median_s"] / op["median_s"] if op else None
        out.append(
            {
                "variant": v,
                "time_ratio": tr,
                "time_ok": tr is not None and tr <= GOAL_TIME,
                "mem_ratio": mr,
                "mem_ok": mr is not None and mr <= GOAL_MEM,
                "step_mem_ratio": mem.get(v, {}).get("step_peak_ratio"),
                "vs_opacus": vs,
                "faster_than_opacus": vs is not None and vs < 1.0,
            }
        )
    return out


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny-llama only, few steps (< 1 min); prints only"
    )
    parser.add_argument("--models", nargs="+", default=None, help="default: smollm2-135m tiny-llama")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=list(PRECISIONS),
        choices=PRECISIONS,
        help="Trainer precisions to time every variant under (interleaved in the same rounds)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1 SmolLM2, 5 tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 8 SmolLM2, 40 tiny)")
    parser.add_argument("--mem-steps", type=int, default=1, help="cold steps per memory process")
    parser.add_argument("--mem-jobs", type=int, default=2, help="memory processes at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see docstring)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--note", action="append", default=[], help="a line for the report's notes (repeatable)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output prefix (default benchmarks/results/dpsgd_overhead; --quick writes nothing unless given)",
    )
    args = parser.parse_args()
    if not args.no_memory:
        start_forkserver()  # imports the libraries in parallel with this process's own imports
    quiet()
    import torch

    torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = args.models or (["tiny-llama"] if args.quick else ["smollm2-135m", "tiny-llama"])
    result: dict[str, Any] = {
        "command": command_line("dpsgd_overhead.py"),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(packages=("opacus", "peft")),
        "device": str(device),
        "models": {},
    }
    for model in models:
        small = model.startswith("tiny")
        warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5) if small else 1
        steps = args.steps if args.steps is not None else (10 if args.quick else 40) if small else 8
        cfg = {
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "warmup": warmup,
            "steps": steps,
            "mem_steps": args.mem_steps,
            "sigma": SIGMA,
            "max_grad_norm": CLIP,
            "lr": LR,
            "lora_rank": 8,
            "lora_alpha": 16,
            "threads": args.threads,
            "precisions": list(args.precisions),
        }
        print(
            f"[{model}] t={time.perf_counter() - T0:.0f}s timing {args.variants} x {args.precisions} ...",
            flush=True,
        )
        timing = time_variants(
            model,
            list(args.variants),
            args.batch_size,
            args.seq_len,
            warmup,
            steps,
            device,
            precisions=list(args.precisions),
        )
        print(f"[{model}] t={time.perf_counter() - T0:.0f}s memory ...", flush=True)
        memory = (
            {}
            if args.no_memory
            else measure_memory(
                model,
                list(args.variants),
                args.batch_size,
                args.seq_len,
                args.mem_steps,
                args.threads,
                args.mem_jobs,
                primary_precision(args.precisions),
            )
        )
        result["models"][model] = model_result(cfg, timing, memory)
    result["wall_s"] = time.perf_counter() - t_start
    result["notes"] = list(args.note)
    publish(
        result, to_markdown(result), args.out or (None if args.quick else str(RESULTS / "dpsgd_overhead"))
    )


if __name__ == "__main__":
    main()
