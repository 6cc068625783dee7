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

Time: all variants live in one process (one model copy each) and are run interleaved, round-robin with the order
rotated every round; ``--warmup`` rounds are discarded, then the median over ``--steps`` rounds is reported, with
the median of the per-round ratios to the non-private step of the same round (robust to load drift).

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
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import gc
import math
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import command_line, machine, publish, quiet, status_kb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("nonprivate", "dp_flat", "dp_per_layer", "dp_per_adapter", "opacus_flat")
DP_VARIANTS = ("dp_flat", "dp_per_layer", "dp_per_adapter")
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


def build_variant(
    variant: str, model_name: str, batch_size: int, device: Any
) -> tuple[Callable[[dict], None], dict]:
    """A fresh model + optimizer for ``variant`` and its step function ``step(batch)``."""
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

        def step(batch: dict) -> None:
            opt.zero_grad(set_to_none=True)
            module.per_example_loss(batch).mean().backward()
            opt.step()

        return step, info

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

        def step(batch: dict) -> None:
            opt.zero_grad(set_to_none=True)
            module.per_example_loss(batch).mean().backward()
            # == DPSGDMixin.backward after super().backward():
            strategy._add_clipped(engine.pop())
            # == DPSGDMixin.optimizer_step's private closure, then the optimizer step:
            strategy.release_noisy_gradient()
            opt.step()

        return step, info

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

        def step(batch: dict) -> None:
            opt.zero_grad(set_to_none=True)
            module.per_example_loss(batch).mean().backward()
            opt.step()

        return step, info

    raise ValueError(f"unknown variant {variant}")


def _sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- timing
def time_variants(
    model_name: str, variants: list[str], batch_size: int, seq_len: int, warmup: int, steps: int, device: Any
) -> dict[str, Any]:

    batches = make_batches(model_name, batch_size, seq_len, device)
    built: dict[str, Callable[[dict], None]] = {}
    infos: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for v in variants:
        try:
            built[v], infos[v] = build_variant(v, model_name, batch_size, device)
        except Exception as exc:  # e.g. an Opacus incompatibility: report it, keep the others
            errors[v] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    names = [v for v in variants if v in built]
    times: dict[str, list[float]] = {v: [] for v in names}
    warm: dict[str, list[float]] = {v: [] for v in names}
    # A full gc.collect() costs ~0.5 s with torch + transformers + lightning loaded: do it once and freeze the
    # survivors, so the collections that still happen during the steps are cheap and alike for every variant.
    gc.collect()
    gc.freeze()
    for r in range(warmup + steps):
        order = names[r % len(names) :] + names[: r % len(names)]
        batch = batches[r % NUM_BATCHES]
        for v in order:
            _sync(device)
            t0 = time.perf_counter()
            try:
                built[v](batch)
            except Exception as exc:
                errors[v] = f"{type(exc).__name__} in step: {str(exc).splitlines()[0][:300]}"
                names.remove(v)
                continue
            _sync(device)
            (warm if r < warmup else times)[v].append(time.perf_counter() - t0)
        print(
            f"  [{model_name}] round {r + 1}/{warmup + steps}" + (" (warm-up)" if r < warmup else ""),
            " ".join(
                f"{v}={(warm if r < warmup else times)[v][-1] * 1e3:.0f}ms" for v in order if v in names
            ),
            flush=True,
        )
    out: dict[str, Any] = {"variants": {}, "errors": errors}
    base = times.get("nonprivate")
    for v in names:
        ts = times[v]
        row: dict[str, Any] = {
            "median_s": statistics.median(ts),
            "mean_s": statistics.fmean(ts),
            "min_s": min(ts),
            "steps_s": ts,
            "warmup_s": warm[v],
            **infos[v],
        }
        if base:
            row["ratio_of_medians"] = row["median_s"] / statistics.median(base)
            row["median_paired_ratio"] = statistics.median(t / b for t, b in zip(ts, base))
        out["variants"][v] = row
    del built
    gc.unfreeze()
    gc.collect()
    return out


# ----------------------------------------------------------------------------------------------- memory
def mem_child(model_name: str, variant: str, batch_size: int, seq_len: int, steps: int) -> dict[str, Any]:
    """Runs in a fresh process: peak memory of ``steps`` cold steps of ``variant``."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batches = make_batches(model_name, batch_size, seq_len, device)
    step, info = build_variant(variant, model_name, batch_size, device)
    gc.collect()
    res: dict[str, Any] = {"variant": variant, "steps": steps, "device": str(device), **info}
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
        step(batches[i % NUM_BATCHES])
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
        return mem_child(spec["model"], spec["variant"], spec["batch_size"], spec["seq_len"], spec["steps"])
    except Exception as exc:  # reported in the table, the other variants go on
        return {
            "variant": spec["variant"],
            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
        }


def measure_memory(
    model_name: str, variants: list[str], batch_size: int, seq_len: int, steps: int, threads: int, jobs: int
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
        "Time: interleaved round-robin in one process, median over the timed rounds; *paired* = median over rounds "
        "of (variant / non-private of the same round). Memory: a fresh process per variant (forked from a "
        "forkserver that only imported the libraries); *process peak* = `ru_maxrss` (Python, libraries, model, "
        "batches and the steps), *step peak* = peak RSS (`VmHWM`) during the steps above the pre-step RSS.",
        "",
    ]
    for model, r in result["models"].items():
        cfg = r["config"]
        lines += [
            f"## {model} (B={cfg['batch_size']}, T={cfg['seq_len']}, {cfg['warmup']} warm-up + {cfg['steps']} timed "
            f"rounds, memory over {cfg['mem_steps']} cold steps)",
            "",
            "| variant | median step (ms) | × non-private (medians) | × non-private (paired) | process peak RSS (MB) "
            "| × | step peak (MB) | × |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v in VARIANTS:
            t = r["time"]["variants"].get(v)
            mem = r["memory"].get(v, {})
            if t is None and v not in r["time"]["errors"]:
                continue
            if t is None:
                lines.append(f"| {v} | failed: {r['time']['errors'][v]} | | | | | | |")
                continue
            peak_key = "peak_mb" if "peak_mb" in mem else "process_peak_mb"
            peak_ratio_key = peak_key.replace("_mb", "_ratio")
            lines.append(
                f"| {v} | {t['median_s'] * 1e3:.1f} | {_f(t.get('ratio_of_medians'), '{:.3f}')} | "
                f"{_f(t.get('median_paired_ratio'), '{:.3f}')} | {_f(mem.get(peak_key), '{:.0f}')} | "
                f"{_f(mem.get(peak_ratio_key), '{:.3f}')} | {_f(mem.get('step_peak_mb'), '{:.0f}')} | "
                f"{_f(mem.get('step_peak_ratio'), '{:.3f}')} |"
            )
        if r["time"]["errors"]:
            lines += ["", "Errors: " + "; ".join(f"`{k}`: {v}" for k, v in r["time"]["errors"].items())]
        lines += [
            "",
            "Goals (DP step ≤ 1.05× non-private time, ≤ 1.10× peak memory, faster than Opacus):",
            "",
        ]
        for g in r["goals"]:
            lines.append(
                f"- `{g['variant']}`: time {g['time_ratio']:.3f}× → {'met' if g['time_ok'] else 'NOT met'}; "
                f"process peak {_f(g['mem_ratio'], '{:.3f}')}× → {'met' if g['mem_ok'] else 'NOT met'} "
                f"(step peak {_f(g['step_mem_ratio'], '{:.3f}')}×); vs Opacus "
                f"{_f(g['vs_opacus'], '{:.2f}')}× → {'faster' if g['faster_than_opacus'] else 'NOT faster' if g['vs_opacus'] else 'n/a'}"
            )
        lines.append("")
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    tv, mem = r["time"]["variants"], r["memory"]
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
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1 SmolLM2, 5 tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 8 SmolLM2, 40 tiny)")
    parser.add_argument("--mem-steps", type=int, default=1, help="cold steps per memory process")
    parser.add_argument("--mem-jobs", type=int, default=2, help="memory processes at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see docstring)")
    parser.add_argument("--no-memory", action="store_true")
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
        }
        print(f"[{model}] t={time.perf_counter() - T0:.0f}s timing {args.variants} ...", flush=True)
        timing = time_variants(
            model, list(args.variants), args.batch_size, args.seq_len, warmup, steps, device
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
            )
        )
        r = {"config": cfg, "time": timing, "memory": memory}
        r["goals"] = goals(r)
        result["models"][model] = r
    result["wall_s"] = time.perf_counter() - t_start
    result["notes"] = []
    publish(
        result, to_markdown(result), args.out or (None if args.quick else str(RESULTS / "dpsgd_overhead"))
    )


if __name__ == "__main__":
    main()
