"""Peak memory and step time of one DP-ZO step vs one inference forward vs one DP-SGD step (SmolLM2-135M).

Every measured configuration runs in a fresh subprocess. Inside it the model is loaded, freed heap is returned to
the OS (``malloc_trim``), the weights are paged in (they are memory-mapped), the peak-RSS counter is reset (``/proc/self/clear_refs``), then the first step runs
(cold, for every configuration alike) and its peak (``VmHWM``) is read. On CUDA the figure is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` instead. So model loading never masks a step.

Configurations (same batch ``B × T`` of token ids for all of them, all examples in the batch: q = 1):

- ``inference``: one ``per_example_loss`` forward under ``torch.no_grad()`` (eval mode); the step time column
  is the time of two such forwards, the work a DP-ZO step must do at least.
- ``dpzo_lora`` / ``dpzo_full`` / ``dpzo_full_inplace``: one optimizer step of :class:`DPZOStrategy` under
  ``Trainer.fit`` (LoRA params / all 135 M params; swap or in-place perturbation), Gaussian noise.
- ``dpsgd_lora``: one step of :class:`DPSGDStrategy` (per-example gradients from hooks, flat clipping, noise).
- ``dpsgd_full``: one step of :class:`DPSGDStrategy` over every ``nn.Linear`` weight of the base model (106 M
  params). The tied embedding / LM head and the RMSNorm gains stay frozen because the per-example-gradient engine
  has no rule for RMSNorm or tied weights, so this *under*-states a true full DP-SGD step.
- ``backward_full``: proxy lower bound for any full-parameter DP-SGD step: a plain (non-private) forward +
  backward over all 135 M params (activations + one gradient copy, no per-example gradients).

Usage::

    .venv/bin/python benchmarks/dpzo_memory.py                      # T = 128 and 512, B = 2, default configs
    .venv/bin/python benchmarks/dpzo_memory.py --seq-lens 128 --batch-size 4 --configs inference dpzo_full
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from common import status_kb, train_only_trainer, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = (
    "inference",
    "dpzo_lora",
    "dpzo_full",
    "dpzo_full_inplace",
    "dpsgd_lora",
    "dpsgd_full",
    "backward_full",
)
DEFAULT_CONFIGS = ("inference", "dpzo_lora", "dpzo_full", "dpsgd_lora", "dpsgd_full")
MODEL = "smollm2-135m"


# ------------------------------------------------------------------------------------------------ memory probes
class Probe:
    """Peak memory of a code region: CUDA allocator peak if CUDA is used, else the process's peak RSS."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.baseline_mb = 0.0
        self.peak_mb = 0.0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self._t0 = 0.0
        self._c0 = 0.0

    def start(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mb = torch.cuda.memory_allocated() / 2**20
        else:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so reuse shows up as new RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (peak RSS) to the current RSS
            self.baseline_mb = status_kb("VmRSS") / 1024
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()

    def stop(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._c0
        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mb = status_kb("VmHWM") / 1024


# ------------------------------------------------------------------------------------------------------ worker
def _batch(batch_size: int, seq_len: int, vocab: int, device: Any) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.to(device),
    }


class _ListDataset:
    def __init__(self, batch: dict[str, Any]) -> None:
        self.rows = [{k: v[i].cpu() for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def _stack(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def worker(config: str, seq_len: int, batch_size: int, threads: int) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from dplightning.module import DPLoRAModule
    from dplightning.strategies import DPSGDStrategy, DPZOStrategy

    warnings.filterwarnings("ignore")
    if threads > 0:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    module = DPLoRAModule(
        model_name=MODEL, lora_rank=8, lora_alpha=16, learning_rate=1e-5, optimizer="sgd", seed=0
    )
    vocab = module.model.get_input_embeddings().num_embeddings
    batch = _batch(batch_size, seq_len, vocab, device)
    module.to(device)
    with torch.no_grad():  # page the (memory-mapped) weights in, so the baseline already holds the model
        for t in [*module.parameters(), *module.buffers()]:
            t.sum()
    probe = Probe(cuda)
    info: dict[str, Any] = {}

    if config == "inference":
        module.to(device).eval()
        with torch.no_grad():
            probe.start()
            module.per_example_loss(batch)
            module.per_example_loss(
                batch
            )  # two forwards: the least a DP-ZO step must compute; same peak as one
            probe.stop()
    elif config == "backward_full":
        module.to(device).train()
        for p in module.parameters():
            p.requires_grad_(True)
        probe.start()
        module.per_example_loss(batch).mean().backward()
        probe.stop()
        info["trainable_params"] = sum(p.numel() for p in module.parameters())
    else:
        if config.startswith("dpzo"):
            strategy: Any = DPZOStrategy(
                mu=1e-3,
                max_loss_diff=1.0,
                noise_multiplier=1.0,
                trainable="lora" if config == "dpzo_lora" else "all",
                perturbation="inplace" if config.endswith("inplace") else "swap",
                device=device,
            )
        else:
            if config == "dpsgd_full":
                for name, m in module.named_modules():
                    if (
                        isinstance(m, nn.Linear)
                        and "lora_" not in name
                        and m is not module.model.get_output_embeddings()
                    ):
                        m.weight.requires_grad_(True)
            strategy = DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, device=device)

        class Measure(pl.Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                if trainer.global_step == 0:
                    probe.start()

            def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
                if trainer.global_step == 1:
                    probe.stop()

        trainer = train_only_trainer(strategy=strategy, max_steps=1, callbacks=[Measure()])
        data = DataLoader(_ListDataset(batch), batch_size=batch_size, collate_fn=_stack)
        trainer.fit(module, data)
        info["trainable_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {
        "config": config,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "device": str(device),
        "metric": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)",
        "peak_mb": round(probe.peak_mb, 1),
        "baseline_mb": round(probe.baseline_mb, 1),
        "delta_mb": round(probe.peak_mb - probe.baseline_mb, 1),
        "seconds": round(probe.seconds, 3),
        "cpu_seconds": round(probe.cpu_seconds, 3),
        "threads": torch.get_num_threads(),
        "model_params": sum(p.numel() for p in module.parameters()),
        **info,
    }


# ------------------------------------------------------------------------------------------------------- driver
def _run_one(config: str, seq_len: int, batch_size: int, threads: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        config,
        "--seq-lens",
        str(seq_len),
        "--batch-size",
        str(batch_size),
    ]
    cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{config} T={seq_len} failed (rc={out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios per sequence length: DP-ZO vs inference, DP-SGD vs DP-ZO, DP-ZO step time vs two forwards."""
    out: dict[str, Any] = {}
    for t in sorted({r["seq_len"] for r in rows}):
        by = {r["config"]: r for r in rows if r["seq_len"] == t}
        inf = by.get("inference")
        s: dict[str, Any] = {}
        for zo in ("dpzo_lora", "dpzo_full", "dpzo_full_inplace"):
            if zo in by and inf:
                s[f"{zo}_vs_inference_peak"] = _ratio(by[zo]["peak_mb"], inf["peak_mb"])
                s[f"{zo}_vs_inference_delta"] = _ratio(by[zo]["delta_mb"], inf["delta_mb"])
                s[f"{zo}_step_vs_two_forwards_cpu_time"] = _ratio(by[zo]["cpu_seconds"], inf["cpu_seconds"])
                s[f"{zo}_step_vs_two_forwards_wall_time"] = _ratio(by[zo]["seconds"], inf["seconds"])
        for sgd, zo in (
            ("dpsgd_lora", "dpzo_lora"),
            ("dpsgd_full", "dpzo_full"),
            ("backward_full", "dpzo_full"),
        ):
            if sgd in by and zo in by:
                s[f"{sgd}_vs_{zo}_peak"] = _ratio(by[sgd]["peak_mb"], by[zo]["peak_mb"])
                s[f"{sgd}_vs_{zo}_delta"] = _ratio(by[sgd]["delta_mb"], by[zo]["delta_mb"])
        out[str(t)] = s
    return out


def markdown(command: str, rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# DP-ZO memory benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Model `{MODEL}` ({meta['model_params']:,} params, fp32), device `{meta['device']}`, metric: {meta['metric']}; "
        f"batch B={meta['batch_size']} of random token ids, every example in the batch (q = 1). Each row is a fresh "
        "process: after loading, the peak counter is reset and the first step is measured (cold, for every row). `peak` includes the loaded "
        "model and runtime; `Δ` is peak minus the resident memory just before the step. Time: one step "
        "(inference row: two forwards, the minimum for a DP-ZO step), as process CPU time (robust to other load) "
        f"and wall time, with {meta['threads']} torch thread(s) per worker (0 = torch default). "
        f"Host: {meta['host']}; load average at start {meta['loadavg']} (shared cores: wall times are noisy).",
        "",
        "| T | config | trainable params | peak MB | Δ MB | CPU s | wall s | peak / inference | Δ / inference Δ | CPU s / inference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        inf = next((x for x in rows if x["seq_len"] == r["seq_len"] and x["config"] == "inference"), None)
        pr = _ratio(r["peak_mb"], inf["peak_mb"]) if inf else float("nan")
        dr = _ratio(r["delta_mb"], inf["delta_mb"]) if inf else float("nan")
        tr = _ratio(r["cpu_seconds"], inf["cpu_seconds"]) if inf else float("nan")
        params = f"{r['trainable_params']:,}" if "trainable_params" in r else "–"
        lines.append(
            f"| {r['seq_len']} | {r['config']} | {params} | {r['peak_mb']:.0f} | {r['delta_mb']:.0f} | {r['cpu_seconds']:.1f} "
            f"| {r['seconds']:.1f} | {pr:.3f} | {dr:.2f} | {tr:.2f} |"
        )
    lines += ["", "Ratios:", ""]
    for t, s in summary.items():
        lines.append(f"- T={t}: " + ", ".join(f"{k} = {v}" for k, v in s.items()))
    lines += [
        "",
        "Notes: `dpsgd_full` trains only the `nn.Linear` weights (106 M of 135 M params: the per-example-gradient "
        "engine has no rule for RMSNorm or the tied embedding), so it understates full DP-SGD; `backward_full` "
        "(plain non-private backward over all params) is a lower bound for any full-parameter DP-SGD step. "
        "`dpzo_full` swaps one perturbed parameter-sized tensor per module call (the 113 MB tied embedding is "
        "the largest); `dpzo_full_inplace` perturbs in place in 4 MB chunks.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=CONFIGS)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (0: torch's default)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "dpzo_memory")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.seq_lens[0], args.batch_size, args.threads)
        print("RESULT " + json.dumps(result), flush=True)
        return

    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    started = time.time()
    for t in args.seq_lens:
        for config in args.configs:
            row = _run_one(config, t, args.batch_size, args.threads)
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = summarize(rows)
    meta = {
        "model": MODEL,
        "model_params": rows[0]["model_params"],
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": rows[0]["device"],
        "metric": rows[0]["metric"],
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "loadavg": loadavg,
        "wall_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "meta": meta, "rows": rows, "summary": summary}
    write_results(str(args.out.with_suffix("")), payload, markdown(command, rows, summary, meta))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
