"""The gap-closure benchmark: its grid, the seed-paired gap arithmetic, and a ``--quick`` run that resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark


def _row(cell: str, kind: str, ppl: float, seed: int | None = None, epsilon: float | None = None) -> dict:
    settings = {
        "kind": kind,
        **({} if seed is None else {"seed": seed}),
        **({} if epsilon is None else {"epsilon": epsilon}),
    }
    return {"cell": cell, "status": "ok", "settings": settings, "test_perplexity_after": ppl}


def test_grid_has_base_then_whole_seeds_and_unique_names() -> None:
    gap = load_benchmark("gap_closure")
    cells = gap.gap_grid((0, 1), (8.0, 2.0), nonprivate_seeds=(0, 1))
    names = [load_benchmark("recipe_sweep").cell_name(c) for c in cells]
    per_seed = len(gap.NONPRIVATE_VARIANTS) + 2
    assert names[0] == "base" and len(names) == len(set(names)) == 1 + 2 * per_seed
    assert [c.get("seed") for c in cells[1:]] == [0] * per_seed + [1] * per_seed


def test_gaps_are_paired_with_the_same_seeds_nonprivate_run() -> None:
    gap = load_benchmark("gap_closure")
    rows = [
        _row("base", "base", 100.0),
        _row("np0", "nonprivate", 10.0, seed=0),
        _row("np0_unstable", "nonprivate", 50.0, seed=0),  # a worse variant is not the reference
        _row("np1", "nonprivate", 1.0, seed=1),
        _row("dp0", "dpsgd", 10.0**0.5 * 10.0, seed=0, epsilon=8.0),  # half of seed 0's log gap
        _row("dp1", "dpsgd", 10.0, seed=1, epsilon=8.0),  # half of seed 1's (wider) log gap
        _row("dp2", "dpsgd", 10.0, seed=2, epsilon=8.0),  # no non-private run for seed 2
    ]
    ((eps, items),) = gap.paired_gaps(rows).items()
    assert eps == 8.0 and [s for s, _, _ in items] == [0, 1, 2]
    assert items[0][2] == pytest.approx(0.5) and items[1][2] == pytest.approx(0.5)
    # seed 2 is measured against the geometric mean of the non-private runs, √(10·1): log gap log(100/√10)
    assert items[2][2] == pytest.approx((2 - 1) / (2 - 0.5))


def test_default_grid_runs_one_nonprivate_reference_and_every_dp_seed() -> None:
    gap = load_benchmark("gap_closure")
    cells = gap.gap_grid()
    kinds = [(c["kind"], c.get("seed"), c.get("epsilon")) for c in cells]
    variants = len(gap.NONPRIVATE_VARIANTS)
    assert kinds[: 1 + variants] == [("base", None, None)] + [("nonprivate", 0, None)] * variants
    assert {"grad_clip": 1.0} in [{k: v for k, v in c.items() if k == "grad_clip"} for c in cells]
    assert sorted(k for k in kinds if k[0] == "dpsgd") == sorted(
        ("dpsgd", s, e) for s in gap.SEEDS for e in gap.EPSILONS
    )


@pytest.mark.slow
def test_quick_gap_closure_runs_resumes_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gap = load_benchmark("gap_closure")
    assert gap.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "recipe_sweep.jsonl").read_text().splitlines()]
    assert {r["cell"] for r in rows} == {
        "base",
        "nonprivate_adamw_lr0.01_s0",
        "dpsgd_adamw_lr0.01_C1_eps8_s0",
    }
    assert all(r["status"] == "ok" and "data_seed=0" in r["data"] for r in rows)
    dp = next(r for r in rows if r["settings"]["kind"] == "dpsgd")
    assert 0 < dp["epsilon_spent"] <= 8.0 + 1e-9
    readme = (tmp_path / "README.md").read_text()
    assert "| 8 |" in readme and (tmp_path / "perplexity_vs_epsilon.png").stat().st_size > 1000
    capsys.readouterr()
    assert gap.main(["--quick", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("done already") == 3
    assert len((tmp_path / "recipe_sweep.jsonl").read_text().splitlines()) == 3  # nothing reran


@pytest.mark.slow
def test_quick_downstream_runs_score_field_extraction(tmp_path: Path) -> None:
    gap = load_benchmark("gap_closure")
    assert gap.main(["--quick", "--downstream", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "recipe_sweep.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert (
            row["status"] == "ok" and row["task"]["max_length"] == 128 and row["task"]["qa_fraction"] == 1.0
        )
        assert 0.0 <= row["downstream_accuracy"] <= 1.0 and 0.0 < row["downstream_majority_rate"] <= 1.0
    assert (
        "goal met" in (tmp_path / "README.md").read_text()
        or "goal not met" in (tmp_path / "README.md").read_text()
    )


def test_shipped_recipe_config_is_the_benchmarked_recipe() -> None:
    import yaml

    gap, sweep = load_benchmark("gap_closure"), load_benchmark("recipe_sweep")
    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "configs" / "dpsgd_recipe.yaml").read_text())
    model, data, trainer = config["model"], config["data"], config["trainer"]
    strategy = trainer["strategy"]["init_args"]
    assert (model["optimizer"], model["learning_rate"], strategy["max_grad_norm"]) == (
        gap.RECIPE["optimizer"],
        gap.RECIPE["lr"],
        gap.RECIPE["clip"],
    )
    task = sweep.FULL_TASK
    assert (data["num_records"], data["max_length"], data["batch_size"], trainer["max_steps"]) == (
        task["num_records"],
        task["max_length"],
        task["batch_size"] * task["accumulate"],
        task["steps"],
    )
    assert (strategy["clipping"], strategy["accountant"], strategy["target_epsilon"]) == ("flat", "pld", 8.0)
    assert (model["lora_rank"], model["lora_target_modules"]) == (8, ["q_proj", "v_proj"])


def test_sgd_recipe_differs_from_the_adamw_recipe_only_in_the_optimiser() -> None:
    import yaml

    root = Path(__file__).resolve().parents[1]
    adamw = yaml.safe_load((root / "configs" / "dpsgd_recipe.yaml").read_text())
    sgd = yaml.safe_load((root / "configs" / "dpsgd_recipe_sgd.yaml").read_text())
    rows = load_benchmark("recipe_sweep").load_rows(
        root / "benchmarks/results/recipe_sweep/recipe_sweep.jsonl"
    )
    swept = {r["cell"] for r in rows if r["status"] == "ok"}
    model = sgd.pop("model")
    assert (model.pop("optimizer"), model.pop("momentum"), model.pop("learning_rate")) == ("sgd", 0.9, 0.5)
    assert f"dpsgd_sgd_m0.9_lr{0.5:g}_C1_eps8" in swept  # the shipped value was measured
    for config in (adamw, sgd):
        config["trainer"]["logger"]["init_args"].pop("name")
    adamw_model = adamw.pop("model")
    adamw_model.pop("optimizer"), adamw_model.pop("learning_rate")
    assert model == adamw_model and sgd == adamw


def test_demo_is_the_downstream_recipe_and_its_references_are_the_stored_rows() -> None:
    """``make demo`` runs the recipe on the downstream task's data; the base and non-private perplexities its
    summary compares against are the stored benchmark rows of that task, not typed-in figures."""
    import yaml

    gap, sweep = load_benchmark("gap_closure"), load_benchmark("recipe_sweep")
    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "configs" / "demo.yaml").read_text())
    model, data, trainer = config["model"], config["data"], config["trainer"]
    strategy = trainer["strategy"]["init_args"]
    assert (model["optimizer"], model["learning_rate"], strategy["max_grad_norm"]) == (
        gap.RECIPE["optimizer"],
        gap.RECIPE["lr"],
        gap.RECIPE["clip"],
    )
    assert (strategy["clipping"], strategy["accountant"], strategy["target_epsilon"]) == ("flat", "pld", 8.0)
    task = gap.DOWNSTREAM_TASK
    assert (data["max_length"], data["qa_fraction"]) == (task["max_length"], task["qa_fraction"])
    # A shortened run: no larger batch and no more steps than the stored private reference.
    assert data["batch_size"] <= task["batch_size"]
    assert (
        data["num_records"],
        data["data_seed"],
        trainer["limit_val_batches"],
        data["eval_batch_size"],
    ) == (
        sweep.FULL_TASK["num_records"],
        gap.PRIVATE_DATA_SEED,
        sweep.FULL_TASK["val_batches"],
        sweep.FULL_TASK["eval_batch_size"],
    )
    assert trainer["max_steps"] <= task["steps"]

    rows = [
        r
        for r in sweep.load_rows(root / "benchmarks/results/recipe_downstream/recipe_sweep.jsonl")
        if r["status"] == "ok"
    ]
    base = next(r for r in rows if r["settings"]["kind"] == "base")
    nonprivate = next(
        r
        for r in rows
        if r["settings"]["kind"] == "nonprivate"
        and r["settings"].get("lr") == gap.DOWNSTREAM_NONPRIVATE["lr"]
    )
    report = next(c["init_args"] for c in trainer["callbacks"] if c["class_path"].endswith("FineTuneReport"))
    assert report["reference_base_perplexity"] == base["val_perplexity_before"]
    assert report["reference_perplexity"] == nonprivate["val_perplexity_after"]
    assert "recipe_downstream" in report["reference_source"]
    downstream = next(c for c in trainer["callbacks"] if c["class_path"].endswith("DownstreamAccuracy"))
    assert downstream["init_args"]["score_before_fit"] is True
