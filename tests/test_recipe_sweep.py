"""The DP-SGD recipe sweep at its ``--quick`` size: both cells run, rows are sound, a rerun skips them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark as _load


def test_cell_names_are_unique_and_references_come_first() -> None:
    sweep = _load("recipe_sweep")
    names = [sweep.cell_name(c) for c in sweep.grid()]
    assert len(names) == len(set(names))
    assert names[:2] == ["base", "nonprivate_adamw_lr0.005"]


def test_gradient_norm_clipping_reaches_only_nonprivate_trainers(tmp_path: Path) -> None:
    sweep = _load("recipe_sweep")
    cell = {"kind": "nonprivate", "optimizer": "adamw", "lr": 1e-2, "grad_clip": 1.0, "seed": 0}
    config = sweep.cell_config(cell, sweep.FULL_TASK, tmp_path)
    assert sweep.cell_name(cell) == "nonprivate_adamw_lr0.01_gc1_s0"
    assert config["trainer"]["gradient_clip_val"] == 1.0 and "strategy" not in config["trainer"]
    plain = sweep.cell_config({**cell, "grad_clip": None}, sweep.FULL_TASK, tmp_path)
    assert "gradient_clip_val" not in plain["trainer"]


def test_gap_closed() -> None:
    sweep = _load("recipe_sweep")
    assert sweep.gap_closed(100.0, 100.0, 10.0) == pytest.approx(0.0)
    assert sweep.gap_closed(10.0, 100.0, 10.0) == pytest.approx(1.0)
    assert sweep.gap_closed(31.622776601683793, 100.0, 10.0) == pytest.approx(0.5)  # half of the log gap
    assert sweep.gap_closed(50.0, None, 10.0) is None


@pytest.mark.slow
def test_quick_sweep_runs_resumes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _load("recipe_sweep")

    assert sweep.main(["--quick", "--out", str(tmp_path), "--report-each"]) == 0
    rows = [json.loads(line) for line in (tmp_path / sweep.JSONL).read_text().splitlines()]
    assert [r["cell"] for r in rows] == ["base", "dpsgd_adamw_lr0.01_C1_eps8"]
    base, dp = rows
    for row in rows:
        assert row["status"] == "ok", row.get("error")
        assert row["threads"] == 2 and len(row["loadavg_before"]) == 3
        assert "data_seed=1" in row["data"]
        assert row["val_perplexity_before"] > 1 and row["test_perplexity_after"] > 1
    assert base["steps"] == 0 and base["sigma"] is None and base["epsilon_spent"] is None
    assert base["val_perplexity_after"] == base["val_perplexity_before"]
    steps = sweep.QUICK_TASK["steps"]
    assert dp["steps"] == steps and dp["step_s"] > 0
    assert 0 < dp["epsilon_spent"] <= 8.0 + 1e-9  # the budget holds
    batch = sweep.QUICK_TASK["batch_size"] * sweep.QUICK_TASK["accumulate"]
    assert dp["sigma"] > 0 and dp["sigma_over_batch"] == pytest.approx(dp["sigma"] / batch)
    assert dp["test_perplexity_before"] == base["test_perplexity_after"]  # the base cell ran first

    capsys.readouterr()
    assert sweep.main(["--quick", "--out", str(tmp_path)]) == 0  # resumable: nothing reruns
    assert capsys.readouterr().out.count("done already") == 2
    assert len((tmp_path / sweep.JSONL).read_text().splitlines()) == 2

    readme = sweep.report(tmp_path).read_text()
    assert "dpsgd_adamw_lr0.01_C1_eps8" in readme and "data_seed=1" in readme
