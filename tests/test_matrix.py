"""The results harness at its ``--quick`` size: every quick method trains, rows are sound, reruns skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark


@pytest.mark.slow
def test_quick_matrix_runs_resumes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_matrix = load_benchmark("run_matrix")
    report_matrix = load_benchmark("report_matrix")

    assert (
        run_matrix.main(["--quick", "--out", str(tmp_path), "--jobs", "2", "--threads", "1"]) == 0
    )  # 2 cells at once
    rows = [json.loads(line) for line in (tmp_path / "matrix.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == set(run_matrix.QUICK_METHODS)
    steps = run_matrix.QUICK_TASK["steps"]
    for row in rows:
        assert row["status"] == "ok", row.get("error")
        assert row["steps"] == steps
        assert row["peak_rss_mb"] > 50
        curve_steps = [s for s, _ in row["val_curve"]]
        assert curve_steps[0] == 0 and curve_steps[-1] == steps, curve_steps
        assert all(p > 1 for _, p in row["val_curve"])
        assert 0.0 <= row["mia_auc"] <= 1.0 and row["canary_exposure"] >= 0.0  # the audits ran in every cell
        if row["method"] == "nonprivate":
            assert row["epsilon_spent"] is None
        else:  # the budget holds in every private cell
            assert 0 < row["epsilon_spent"] <= row["epsilon"] + 1e-9
            assert row["trajectories"]["privacy/noise_multiplier"]
            assert row["empirical_epsilon_lower_bound"] <= row["epsilon_spent"]
    by_method = {r["method"]: r for r in rows}
    # without noise the LoRA weights move: held-out perplexity drops over the run
    curve = by_method["nonprivate"]["val_curve"]
    assert curve[-1][1] < curve[0][1]
    # per-adapter thresholds of the RLDP cell are read back from TensorBoard
    assert any(t.startswith("privacy/clip/") for t in by_method["rldp"]["trajectories"])

    capsys.readouterr()
    assert run_matrix.main(["--quick", "--out", str(tmp_path)]) == 0  # resumable: nothing reruns
    assert capsys.readouterr().out.count("done already") == len(rows)
    assert len((tmp_path / "matrix.jsonl").read_text().splitlines()) == len(rows)

    readme = report_matrix.report(tmp_path).read_text()
    assert "| dpsgd_flat |" in readme and "Test perplexity" in readme and "### Targets" in readme
    for png in ("perplexity_vs_epsilon.png", "perplexity_vs_step.png", "rldp_sigma_thresholds.png"):
        assert (tmp_path / png).stat().st_size > 1000
