"""benchmarks/dpsgd_overhead.py: the precision axis (bf16-mixed vs 32-true) on a tiny model, fast."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import load_benchmark

VARIANTS = ["nonprivate", "dp_flat"]


def _positive_finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench() -> Any:
    return load_benchmark("dpsgd_overhead")


def test_bf16_rows_speedups_and_dp_costs_on_a_tiny_model(bench: Any) -> None:
    cpu = torch.device("cpu")
    timing = bench.time_variants("tiny-llama", VARIANTS, 2, 16, 1, 2, cpu, precisions=bench.PRECISIONS)
    assert timing["errors"] == {}
    r = bench.model_result(
        {"batch_size": 2, "seq_len": 16, "warmup": 1, "steps": 2, "mem_steps": 1}, timing, {}
    )
    assert r["time"]["primary_precision"] == "32-true"
    for p in bench.PRECISIONS:
        for v in VARIANTS:
            row = timing["by_precision"][p][v]
            assert row["precision"] == p and len(row["steps_s"]) == 2
            assert _positive_finite(row["median_s"]) and _positive_finite(row["median_paired_ratio"])
            if v == "nonprivate":
                assert "median_clip_s" not in row and "median_release_s" not in row
            else:  # the strategy's own clipping and release, timed inside the step
                assert 0 < row["median_clip_s"] + row["median_release_s"] < row["median_s"]
    bf16 = r["precision"]["bf16-mixed"]
    assert set(bf16) == set(VARIANTS)
    for v in VARIANTS:
        assert _positive_finite(bf16[v]["speedup_paired"]) and _positive_finite(bf16[v]["speedup_of_medians"])
    assert bf16["nonprivate"]["dp_cost_32-true"] is None
    assert _positive_finite(bf16["dp_flat"]["dp_cost_32-true"])
    assert _positive_finite(bf16["dp_flat"]["dp_cost_bf16-mixed"])
    assert (
        bf16["dp_flat"]["dp_cost_bf16-mixed"]
        == timing["by_precision"]["bf16-mixed"]["dp_flat"]["median_paired_ratio"]
    )
    load = timing["loadavg_1min_during"]
    assert len(load["per_round"]) == 2 and load["min"] <= load["median"] <= load["max"]
    # The goals are judged on the 32-true rows, the report shows the bf16 table.
    assert [g["variant"] for g in r["goals"]] == ["dp_flat"]
    assert r["goals"][0]["time_ratio"] == timing["by_precision"]["32-true"]["dp_flat"]["median_paired_ratio"]
    result = {
        "command": "x",
        "date": "d",
        "wall_s": 1.0,
        "machine": {
            "nproc": 2,
            "torch": "t",
            "torch_threads": 1,
            "cuda": None,
            "loadavg_at_start": (1.0, 1.0, 1.0),
        },
        "models": {"tiny-llama": r},
    }
    md = bench.to_markdown(result)
    assert "| bf16-mixed speed-up (paired) |" in md
    assert md.count("| dp_flat |") == 2 and md.count("| nonprivate |") == 2


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_dp_step_autocasts_only_the_forward(
    bench: Any, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under bf16-mixed the forward runs in bf16; the strategy's clipping runs outside autocast and the released
    gradients are float32, as in ``Trainer.fit`` with the same plugin."""
    import dplightning.strategies.dpsgd as dpsgd

    cpu = torch.device("cpu")
    seen: dict[str, Any] = {}
    clip = dpsgd.clip_to_grid_and_sum

    def recording_clip(*args: Any, **kwargs: Any) -> Any:
        seen["autocast_in_clipping"] = torch.is_autocast_enabled("cpu")
        return clip(*args, **kwargs)

    monkeypatch.setattr(dpsgd, "clip_to_grid_and_sum", recording_clip)
    step, _, module = bench.build_variant("dp_flat", "tiny-llama", 2, cpu)
    head = module.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: seen.__setitem__("logits", out.dtype))
    batch = bench.make_batches("tiny-llama", 2, 16, cpu)[0]
    step(batch, bench.precision_plugin(precision, cpu))
    handle.remove()
    assert seen["logits"] == (torch.bfloat16 if precision == "bf16-mixed" else torch.float32)
    assert seen["autocast_in_clipping"] is False
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(
        g is not None and g.dtype == torch.float32 and bool(g.isfinite().all()) for g in grads
    )
    assert all(p.dtype == torch.float32 for p in module.parameters())
