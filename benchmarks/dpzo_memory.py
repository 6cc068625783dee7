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

Precision: every configuration runs under ``32-true``; ``--bf16-configs`` (default ``inference dpzo_lora
dpsgd_lora``) also run under ``bf16-mixed`` at ``--bf16-seq-lens`` (default 128), each right after its ``32-true``
row. The strategies' rows pass ``precision="bf16-mixed"`` to the ``Trainer`` (Lightning's precision plugin, so
exactly what a user's run does): DP-SGD's forward runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``,
its per-example clipping and noise outside it; :class:`DPZOStrategy` runs its perturbed forwards in the
parameters' own precision (float32) under any Trainer precision, since the loss differences are below bf16's
resolution, so its bf16 row should cost the same as its float32 row. The inference row runs its forwards inside
the same plugin's ``forward_context()``: what two forwards would cost in bf16.

Time: the measured first step is cold (oneDNN creates its kernels per shape and dtype on first use); a second,
warm step is timed after it in the same process (inference row: two more forwards) and the bf16 speed-ups are
given for both. The 1-minute load average is read after each row.

Usage::

    .venv/bin/python benchmarks/dpzo_memory.py                      # T = 128 and 512, B = 2, default configs
    .venv/bin/python benchmarks/dpzo_memory.py --seq-lens 128 --batch-size 4 --configs inference dpzo_full
    .venv/bin/python benchmarks/dpzo_memory.py --seq-lens 128 --bf16-configs      # no bf16-mixed rows
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
PRECISIONS = ("32-true", "bf16-mixed")
DEFAULT_BF16_CONFIGS = ("inference", "dpzo_lora", "dpsgd_lora")
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


def precision_plugin(precision: str, device: Any) -> Any:
    """The precision plugin ``Trainer(precision=precision)`` builds on ``device`` (used for the inference row;
    the strategies' rows give ``precision`` to the ``Trainer`` itself)."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    if precision == "32-true":
        return Precision()
    if precision == "bf16-mixed":
        return MixedPrecision("bf16-mixed", "cuda" if str(device).startswith("cuda") else "cpu")
    raise ValueError(f"unknown precision {precision}")


class _Timer:
    """Wall and process CPU time of a second (warm) step."""

    def __init__(self) -> None:
        self.seconds = self.cpu_seconds = 0.0
        self._t0 = self._c0 = 0.0

    def start(self) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self, device: Any) -> None:
        import torch

        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._c0


def _strategy(config: str, module: Any, device: Any) -> Any:
    """The strategy of a ``dpzo_*`` / ``dpsgd_*`` config (``dpsgd_full`` also unfreezes the linear weights)."""
    from torch import nn

    from dplightning.strategies import DPSGDStrategy, DPZOStrategy

    if config.startswith("dpzo"):
        return DPZOStrategy(
            mu=1e-3,
            max_loss_diff=1.0,
            noise_multiplier=1.0,
            trainable="lora" if config == "dpzo_lora" else "all",
            perturbation="inplace" if config.endswith("inplace") else "swap",
            device=device,
        )
    if config == "dpsgd_full":
        for name, m in module.named_modules():
            if (
                isinstance(m, nn.Linear)
                and "lora_" not in name
                and m is not module.model.get_output_embeddings()
            ):
                m.weight.requires_grad_(True)
    return DPSGDStrategy(noise_multiplier=1.0, max_grad_norm=1.0, device=device)


def worker(
    config: str,
    seq_len: int,
    batch_size: int,
    threads: int,
    precision: str = "32-true",
    model: str = MODEL,
) -> dict[str, Any]:
    """One measured row (run in a fresh process by the driver; ``model`` other than :data:`MODEL` for tests)."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from dplightning.module import DPLoRAModule

    warnings.filterwarnings("ignore")
    if threads > 0:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    module = DPLoRAModule(
        model_name=model, lora_rank=8, lora_alpha=16, learning_rate=1e-5, optimizer="sgd", seed=0
    )
    vocab = module.model.get_input_embeddings().num_embeddings
    batch = _batch(batch_size, seq_len, vocab, device)
    module.to(device)
    with torch.no_grad():  # page the (memory-mapped) weights in, so the baseline already holds the model
        for t in [*module.parameters(), *module.buffers()]:
            t.sum()
    probe = Probe(cuda)
    warm = _Timer()
    info: dict[str, Any] = {}

    if config == "inference":
        module.to(device).eval()
        plugin = precision_plugin(precision, device)
        with torch.no_grad(), plugin.forward_context():
            probe.start()
            module.per_example_loss(batch)
            module.per_example_loss(
                batch
            )  # two forwards: the least a DP-ZO step must compute; same peak as one
            probe.stop()
            warm.start()
            module.per_example_loss(batch)
            module.per_example_loss(batch)
            warm.stop(device)
    elif config == "backward_full":
        module.to(device).train()
        for p in module.parameters():
            p.requires_grad_(True)
        plugin = precision_plugin(precision, device)
        probe.start()
        with plugin.forward_context():
            loss = module.per_example_loss(batch).mean()
        loss.backward()
        probe.stop()
        warm.start()
        with plugin.forward_context():
            loss = module.per_example_loss(batch).mean()
        loss.backward()
        warm.stop(device)
        info["trainable_params"] = sum(p.numel() for p in module.parameters())
    else:
        strategy = _strategy(config, module, device)

        class Measure(pl.Callback):
            """Peak and time of the first (cold) step, then the time of the second (warm) one."""

            def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                if trainer.global_step == 0:
                    probe.start()
                elif trainer.global_step == 1:
                    warm.start()

            def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
                if trainer.global_step == 1:
                    probe.stop()
                elif trainer.global_step == 2:
                    warm.stop(device)

        trainer = train_only_trainer(
            strategy=strategy, max_steps=2, precision=precision, callbacks=[Measure()]
        )
        data = DataLoader(_ListDataset(batch), batch_size=batch_size, collate_fn=_stack)
        trainer.fit(module, data)
        assert trainer.global_step == 2 and warm.seconds > 0, "the warm step did not run"
        info["trainer_precision"] = str(trainer.precision)
        info["trainable_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {
        "config": config,
        "model": model,
        "precision": precision,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "device": str(device),
        "metric": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)",
        "peak_mb": round(probe.peak_mb, 1),
        "baseline_mb": round(probe.baseline_mb, 1),
        "delta_mb": round(probe.peak_mb - probe.baseline_mb, 1),
        "seconds": round(probe.seconds, 3),
        "cpu_seconds": round(probe.cpu_seconds, 3),
        "warm_seconds": round(warm.seconds, 3),
        "warm_cpu_seconds": round(warm.cpu_seconds, 3),
        "threads": torch.get_num_threads(),
        "model_params": sum(p.numel() for p in module.parameters()),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
        **info,
    }


# ------------------------------------------------------------------------------------------------------- driver
def _run_one(
    config: str, seq_len: int, batch_size: int, threads: int, precision: str = "32-true"
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        config,
        "--seq-lens",
        str(seq_len),
        "--batch-size",
        str(batch_size),
        "--precision",
        precision,
    ]
    cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(
            f"{config} {precision} T={seq_len} failed (rc={out.returncode}):\n{out.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios per sequence length (``32-true`` rows): DP-ZO vs inference, DP-SGD vs DP-ZO, DP-ZO step time vs
    two forwards; under ``"bf16-mixed"``: each config's bf16 speed-up (its ``32-true`` row's time / its
    ``bf16-mixed`` row's, cold and warm step, CPU and wall time) and peak ratio, per sequence length."""
    out: dict[str, Any] = {}
    fp32 = [r for r in rows if r.get("precision", "32-true") == "32-true"]
    for t in sorted({r["seq_len"] for r in fp32}):
        by = {r["config"]: r for r in fp32 if r["seq_len"] == t}
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
    bf16: dict[str, Any] = {}
    for r in rows:
        if r.get("precision") != "bf16-mixed":
            continue
        ref = next((x for x in fp32 if x["seq_len"] == r["seq_len"] and x["config"] == r["config"]), None)
        if ref is None:
            continue
        bf16.setdefault(str(r["seq_len"]), {})[r["config"]] = {
            "speedup_cold_cpu": _ratio(ref["cpu_seconds"], r["cpu_seconds"]),
            "speedup_cold_wall": _ratio(ref["seconds"], r["seconds"]),
            "speedup_warm_cpu": _ratio(ref["warm_cpu_seconds"], r["warm_cpu_seconds"]),
            "speedup_warm_wall": _ratio(ref["warm_seconds"], r["warm_seconds"]),
            "peak_vs_32_true": _ratio(r["peak_mb"], ref["peak_mb"]),
            "delta_vs_32_true": _ratio(r["delta_mb"], ref["delta_mb"]),
        }
    if bf16:
        out["bf16-mixed"] = bf16
    return out


def _inference_row(rows: list[dict[str, Any]], r: dict[str, Any]) -> dict[str, Any] | None:
    """The inference row of ``r``'s sequence length and precision (else of its sequence length in 32-true)."""
    same = [x for x in rows if x["seq_len"] == r["seq_len"] and x["config"] == "inference"]
    return next((x for x in same if x.get("precision") == r.get("precision")), None) or next(
        (x for x in same if x.get("precision", "32-true") == "32-true"), None
    )


def markdown(command: str, rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# DP-ZO memory benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Model `{MODEL}` ({meta['model_params']:,} params, fp32 weights), device `{meta['device']}`, metric: {meta['metric']}; "
        f"batch B={meta['batch_size']} of random token ids, every example in the batch (q = 1). Each row is a fresh "
        "process: after loading, the peak counter is reset and the first step is measured (cold, for every row). `peak` includes the loaded "
        "model and runtime; `Δ` is peak minus the resident memory just before the step. Time: one step "
        "(inference row: two forwards, the minimum for a DP-ZO step), as process CPU time (robust to other load) "
        f"and wall time, with {meta['threads']} torch thread(s) per worker (0 = torch default); *warm* = a second "
        "step timed after it in the same process. Precision: the `Trainer`'s (inference row: its plugin's forward "
        "context); under `bf16-mixed` DP-SGD's forward is autocast to bf16 while DP-ZO's forwards stay float32 "
        "by design (see the script docstring). Ratios to inference use the inference row of the same T and "
        "precision. "
        f"Host: {meta['host']}; load average at start {meta['loadavg']}, *load* = 1-minute load average after "
        "each row (shared cores: wall times are noisy).",
        "",
        "| T | config | precision | trainable params | peak MB | Δ MB | CPU s | wall s | warm CPU s | warm wall s "
        "| load | peak / inference | Δ / inference Δ | CPU s / inference |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        inf = _inference_row(rows, r)
        pr = _ratio(r["peak_mb"], inf["peak_mb"]) if inf else float("nan")
        dr = _ratio(r["delta_mb"], inf["delta_mb"]) if inf else float("nan")
        tr = _ratio(r["cpu_seconds"], inf["cpu_seconds"]) if inf else float("nan")
        params = f"{r['trainable_params']:,}" if "trainable_params" in r else "–"
        lines.append(
            f"| {r['seq_len']} | {r['config']} | {r.get('precision', '32-true')} | {params} | {r['peak_mb']:.0f} "
            f"| {r['delta_mb']:.0f} | {r['cpu_seconds']:.1f} | {r['seconds']:.1f} | {r['warm_cpu_seconds']:.1f} "
            f"| {r['warm_seconds']:.1f} | {r['loadavg_1min_after']:.1f} | {pr:.3f} | {dr:.2f} | {tr:.2f} |"
        )
    lines += ["", "Ratios (32-true):", ""]
    for t, s in summary.items():
        if t != "bf16-mixed":
            lines.append(f"- T={t}: " + ", ".join(f"{k} = {v}" for k, v in s.items()))
    if "bf16-mixed" in summary:
        lines += [
            "",
            "bf16-mixed vs 32-true (same config and T, separate processes run one after the other; speed-up = "
            "32-true time / bf16-mixed time):",
            "",
            "| T | config | speed-up, cold step CPU | cold wall | warm step CPU | warm wall | peak × 32-true | "
            "Δ × 32-true |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for t, per in summary["bf16-mixed"].items():
            for config, b in per.items():
                lines.append(
                    f"| {t} | {config} | {b['speedup_cold_cpu']:.2f} | {b['speedup_cold_wall']:.2f} | "
                    f"{b['speedup_warm_cpu']:.2f} | {b['speedup_warm_wall']:.2f} | {b['peak_vs_32_true']:.3f} | "
                    f"{b['delta_vs_32_true']:.2f} |"
                )
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


def plan(
    seq_lens: list[int], configs: list[str], bf16_configs: list[str], bf16_seq_lens: list[int]
) -> list[tuple[str, int, str]]:
    """``(config, T, precision)`` in run order: every config in ``32-true``, each bf16 row right after its
    ``32-true`` row (a bf16 config or T not otherwise listed still gets its ``32-true`` reference row)."""
    out: list[tuple[str, int, str]] = []
    for t in [*seq_lens, *(x for x in bf16_seq_lens if x not in seq_lens)]:
        for config in [*configs, *(c for c in bf16_configs if c not in configs)]:
            bf16 = config in bf16_configs and t in bf16_seq_lens
            if (config in configs and t in seq_lens) or bf16:
                out.append((config, t, "32-true"))
            if bf16:
                out.append((config, t, "bf16-mixed"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=CONFIGS)
    parser.add_argument(
        "--bf16-configs",
        nargs="*",
        default=list(DEFAULT_BF16_CONFIGS),
        choices=CONFIGS,
        help="configs also run under bf16-mixed (none: give the option without values)",
    )
    parser.add_argument(
        "--bf16-seq-lens", type=int, nargs="+", default=[128], help="sequence lengths of the bf16-mixed rows"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (0: torch's default)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "dpzo_memory")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.seq_lens[0], args.batch_size, args.threads, args.precision)
        print("RESULT " + json.dumps(result), flush=True)
        return

    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    started = time.time()
    for config, t, precision in plan(args.seq_lens, args.configs, args.bf16_configs, args.bf16_seq_lens):
        row = _run_one(config, t, args.batch_size, args.threads, precision)
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
