"""benchmarks/dpzo_memory.py: the bf16-mixed rows on a tiny model, in this process, fast."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import load_benchmark

CONFIGS = ["inference", "dpzo_lora", "dpsgd_lora"]


def test_bf16_rows_follow_the_trainer_precision_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 rows exist with positive finite speed-ups; DP-SGD's and inference's forwards run under autocast, DP-ZO's
    never do (its strategy keeps them in float32 under a bf16-mixed Trainer)."""
    from dplightning.module import DPLoRAModule

    bench = load_benchmark("dpzo_memory")
    plan = bench.plan([16], ["inference", "dpzo_lora", "dpzo_full", "dpsgd_lora"], CONFIGS, [16])
    assert plan == [
        ("inference", 16, "32-true"),
        ("inference", 16, "bf16-mixed"),
        ("dpzo_lora", 16, "32-true"),
        ("dpzo_lora", 16, "bf16-mixed"),
        ("dpzo_full", 16, "32-true"),
        ("dpsgd_lora", 16, "32-true"),
        ("dpsgd_lora", 16, "bf16-mixed"),
    ]
    plan = [step for step in plan if step[0] != "dpzo_full"]
    autocast: dict[tuple[str, str], set[bool]] = {}
    current: list[tuple[str, str]] = []
    forward = DPLoRAModule.per_example_loss

    def recording_forward(self: Any, batch: Any) -> Any:
        autocast.setdefault(current[-1], set()).add(torch.is_autocast_enabled("cpu"))
        return forward(self, batch)

    monkeypatch.setattr(DPLoRAModule, "per_example_loss", recording_forward)
    rows = []
    for config, t, precision in plan:
        current.append((config, precision))
        rows.append(bench.worker(config, t, 2, 0, precision, model="tiny-llama"))
    assert [(r["config"], r["precision"]) for r in rows] == [(c, p) for c, _, p in plan]
    for r in rows:
        assert r["warm_seconds"] > 0 and r["warm_cpu_seconds"] >= 0 and r["seconds"] > 0
        if r["config"] != "inference":
            assert r["trainer_precision"] == r["precision"]
    assert autocast[("dpzo_lora", "bf16-mixed")] == {False}
    assert autocast[("dpsgd_lora", "bf16-mixed")] == {True}
    assert autocast[("inference", "bf16-mixed")] == {True}
    assert all(autocast[(c, "32-true")] == {False} for c in CONFIGS)

    summary = bench.summarize(rows)
    assert set(summary["bf16-mixed"]["16"]) == set(CONFIGS)
    for b in summary["bf16-mixed"]["16"].values():
        for key in ("speedup_cold_cpu", "speedup_warm_wall", "speedup_warm_cpu", "peak_vs_32_true"):
            assert math.isfinite(b[key]) and b[key] > 0
    assert "dpzo_lora_vs_inference_peak" in summary["16"]
    meta = {
        "model_params": rows[0]["model_params"],
        "batch_size": 2,
        "threads": 0,
        "device": "cpu",
        "metric": rows[0]["metric"],
        "host": "h",
        "loadavg": "1 1 1",
    }
    md = bench.markdown("cmd", rows, summary, meta)
    assert md.count("| 16 | dpzo_lora | bf16-mixed |") == 1
    assert "| 16 | dpsgd_lora |" in md.split("bf16-mixed vs 32-true")[1]
