"""The method matrix at its ``--quick`` size: timing, tuning, grid and control cells run, rows carry the audits,
choices come from the tuning cells, and a second invocation reruns nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark


@pytest.mark.slow
def test_quick_matrix_tunes_runs_audits_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_matrix = load_benchmark("run_matrix")
    assert run_matrix.main(["--quick", "--out", str(tmp_path), "--jobs", "2", "--threads", "1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "recipe_sweep.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    by_cell = {r["cell"]: r for r in rows}
    assert len(by_cell) == len(rows)  # no cell ran twice
    roles = {r["settings"].get("role") for r in rows}
    assert {"timing", "tune", "grid", "control"} <= roles

    plan = json.loads((tmp_path / "plan.json").read_text())
    # DP-ZO's step count is DP-SGD's times the measured batch-time ratio
    timing = plan["timing"]
    assert timing["zo_steps"] == max(1, round(timing["dpsgd_steps"] * timing["ratio"]))
    assert by_cell["dpzo_laplace_eps8_s0"]["steps"] == timing["zo_steps"]
    # each tuned method runs its grid cells at the setting with the lowest public validation perplexity
    tuned = plan["tuned"]
    tune = [
        r for r in rows if r["settings"].get("role") == "tune" and r["settings"]["method"] == "dpzo_laplace"
    ]
    best = min(tune, key=lambda r: r["val_perplexity_after"])
    assert (
        tuned["dpzo_laplace"]["lr"]
        == best["settings"]["lr"]
        == by_cell["dpzo_laplace_eps8_s0"]["settings"]["lr"]
    )
    assert all(r["settings"]["data_seed"] == 1 for r in tune)  # tuned on public notes only
    assert tuned["rldp"]["controller"] == "rldp" and not tuned["dpsgd_flat"]["fallback"]

    for name in ("dpsgd_flat_eps8_s0", "rldp_eps8_s0", "dpzo_laplace_eps8_s0", "nonprivate_epsinf_s0"):
        row = by_cell[name]
        assert 0.0 <= row["mia_auc"] <= 1.0 and row["mia_auc_se"] > 0 and row["mia_members"] >= 2
        assert row["canary_exposure"] >= 0.0 and "canary_exposure_r8" in row
        assert len(row["val_curve"]) >= 3  # validated along the way, not only at the end
        if name != "nonprivate_epsinf_s0":  # the budget holds in every private cell
            assert 0 < row["epsilon_spent"] <= row["settings"]["epsilon"] + 1e-9
            assert row["empirical_epsilon_lower_bound"] <= row["epsilon_spent"]
    configs = {name: json.loads((tmp_path / "configs" / f"{name}.yaml").read_text()) for name in by_cell}
    laplace = configs["dpzo_laplace_eps8_s0"]["trainer"]["strategy"]["init_args"]
    assert laplace["noise"] == "laplace" and laplace["target_delta"] == 0.0  # pure ε
    # the control trains on fewer notes (so it sees each several times) and is audited like the grid
    control, nonprivate = configs["control_memorise_s0"]["data"], configs["nonprivate_epsinf_s0"]["data"]
    assert control["num_records"] == run_matrix.QUICK_CONTROL_DATA["num_records"] < nonprivate["num_records"]
    assert "mia_auc" in by_cell["control_memorise_s0"]

    # the downstream block: field extraction scored after fit, at its own task size, DP-ZO steps timed for it
    downstream = {n: r for n, r in by_cell.items() if r["settings"].get("role") == "downstream"}
    assert set(downstream) == {
        "downstream_pretrained",
        "downstream_nonprivate_epsinf_s0",
        "downstream_dpsgd_flat_eps2_s0",
        "downstream_dpzo_laplace_eps2_s0",
    }
    for row in downstream.values():
        assert 0.0 <= row["downstream_accuracy"] <= 1.0 and row["settings"]["max_length"] == 128
    assert downstream["downstream_dpzo_laplace_eps2_s0"]["steps"] == plan["downstream"]["timing"]["zo_steps"]
    assert "downstream_accuracy" not in by_cell["dpsgd_flat_eps8_s0"] or (
        by_cell["dpsgd_flat_eps8_s0"]["downstream_accuracy"] is None
    )

    capsys.readouterr()
    assert run_matrix.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "test ppl" not in capsys.readouterr().out  # resumable: nothing reran
    assert len((tmp_path / "recipe_sweep.jsonl").read_text().splitlines()) == len(rows)
    assert (tmp_path / "README.md").is_file()


def test_grid_cells_follow_the_tuned_settings_and_the_low_epsilon_rule() -> None:
    run_matrix = load_benchmark("run_matrix")
    tuned = {
        "pretrained": {},
        "nonprivate": {"lr": 0.01},
        "dpsgd_flat": {"lr": 0.25, "schedule": "linear"},
        "rldp": {"lr": 0.5, "schedule": "constant", "controller": "rldp_prior"},
        "dpzo_gaussian": {"lr": 5e-5, "mu": 1e-2, "steps": 180},
    }
    cells = run_matrix.grid_cells(tuple(run_matrix.METHODS), tuned, (8.0, 2.0), (0, 1))
    names = [c["name"] for c in cells]
    assert names[0] == "pretrained" and len(names) == len(set(names))
    # methods without a tuned setting (not tuned yet) have no cells
    assert not any(n.startswith(("automatic", "quantile", "dpzo_laplace")) for n in names)
    assert {n for n in names if "eps0.5" in n} == {
        f"{m}_eps0.5_s{s}" for m in ("dpsgd_flat", "rldp") for s in (0, 1)
    }
    flat = next(c for c in cells if c["name"] == "dpsgd_flat_eps2_s1")
    assert (flat["lr"], flat["schedule"], flat["seed"], flat["epsilon"]) == (0.25, "linear", 1, 2.0)
    assert next(c for c in cells if c["name"] == "rldp_eps8_s0")["controller"] == "rldp_prior"
    zo = next(c for c in cells if c["name"] == "dpzo_gaussian_eps8_s1")
    assert (zo["steps"], zo["mu"], zo["noise"]) == (180, 1e-2, "gaussian")
    assert all(c.get("audit") for c in cells if c["name"] != "pretrained")


def test_dp_zo_steps_wait_for_every_timing_round() -> None:
    run_matrix = load_benchmark("run_matrix")

    def row(name: str, t: float) -> dict[str, object]:
        return {"cell": name, "status": "ok", "median_batch_s": t}

    rows = [
        row("timing_dpsgd_flat_r0", 3.0),
        row("timing_dpzo_gaussian_r0", 1.0),
        row("timing_dpsgd_flat_r1", 2.0),
    ]
    assert run_matrix.zo_steps_from(rows, 2, 70) is None
    rows.append(row("timing_dpzo_gaussian_r1", 1.0))
    timing = run_matrix.zo_steps_from(rows, 2, 70)
    assert timing["ratio"] == 2.5 and timing["zo_steps"] == 175  # median of 3.0 and 2.0
