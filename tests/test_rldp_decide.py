"""The RLDP decision experiment: its cells and their order, the configs of M4–M7, the selections (M2 per seed on
private validation, M3 on public runs, M4 private with its ε account), the paired statistics, and a ``--quick``
run that resumes."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import ROOT, load_benchmark


@functools.cache
def _modules() -> tuple[Any, Any]:
    """The benchmark scripts, loaded once (each load executes the script)."""
    return load_benchmark("rldp_decide"), load_benchmark("recipe_sweep")


def _row(settings: dict[str, Any], val: float, test: float, **extra: Any) -> dict[str, Any]:
    return {
        "cell": _modules()[1].cell_name(settings),
        "status": "ok",
        "settings": settings,
        "task": _modules()[0].QUICK_TASK,
        "val_perplexity_after": val,
        "test_perplexity_after": test,
        **extra,
    }


# ------------------------------------------------------------------------------------------------ cells
def test_cells_come_in_order_of_use_once_each() -> None:
    decide, sweep = _modules()
    cells = decide.decide_grid()
    names = [sweep.cell_name(c) for c in cells]
    assert len(names) == len(set(names)) and names[0] == "base"
    # first ε = 8, seed 0, of every method: M2's grid, M7, M6, M5, M4's trials (at 8/4), M3's public runs, adamw
    grid = len(decide.GRID)
    first_block = cells[1 : 1 + 3 * grid + 4]
    assert {c["seed"] for c in first_block} == {0}
    assert {c["epsilon"] for c in first_block} == {8.0, 8.0 / decide.K_TRIALS}
    assert {c.get("controller") for c in first_block} == {None, "rldp", "plateau", "rldp_prior"}
    assert sum(c.get("data_seed") == decide.PUBLIC_DATA_SEED for c in first_block) == grid
    assert first_block[-1]["optimizer"] == "adamw"
    second = cells[1 + 3 * grid + 4]  # then ε = 8, seed 1: every method at ε = 8 over 3 seeds before ε = 2
    assert (second["seed"], second["epsilon"]) == (1, 8.0)
    every = decide.SEEDS[0]
    main = [c for c in cells[1:] if c["seed"] < every]
    last_eps8 = max(i for i, c in enumerate(main) if c["epsilon"] == 8.0)
    first_eps2 = min(i for i, c in enumerate(main) if c["epsilon"] == 2.0 and c.get("controller"))
    assert last_eps8 < first_eps2
    assert [c["seed"] for c in main if c["epsilon"] == 8.0] == sorted(
        c["seed"] for c in main if c["epsilon"] == 8.0
    )
    extra = cells[1 + len(main) :]  # the grid's and M7's extra seeds come last
    assert extra and all(c["seed"] >= every for c in extra)

    def count(**match: Any) -> int:
        return sum(all(c.get(k) == v for k, v in match.items()) for c in cells)

    for eps in decide.EPSILONS:
        assert count(controller="rldp_prior", epsilon=eps) == 5
        assert count(controller="rldp", epsilon=eps) == count(controller="plateau", epsilon=eps) == 3
        assert count(optimizer="adamw", epsilon=eps) == 3
        assert count(data_seed=1, epsilon=eps, seed=0) == len(decide.GRID)
    plain = [
        c for c in cells if c.get("optimizer") == "sgd" and not c.get("controller") and "data_seed" not in c
    ]
    # M2's grid: 5 seeds at ε = 8 and 2; M4's trials at 8/4 are those ε = 2 cells, and 3 seeds at 2/4
    assert sum(c["epsilon"] == 8.0 for c in plain) == sum(c["epsilon"] == 2.0 for c in plain) == 5 * 4
    assert sum(c["epsilon"] == 0.5 for c in plain) == 3 * 4
    without_prior = decide.decide_grid(prior=False)
    assert not any(c.get("controller") == "rldp_prior" for c in without_prior)


def test_configs_follow_the_regime_and_the_shipped_controllers(tmp_path: Path) -> None:
    decide, _ = _modules()
    shipped = yaml.safe_load((ROOT / "configs" / "rldp_recipe.yaml").read_text())
    task = {**decide.FULL_TASK, "policy_path": "prior.zip"}
    data, model = shipped["data"], shipped["model"]
    assert (task["num_records"], task["public_fraction"], task["max_length"]) == (
        data["num_records"],
        data["public_fraction"],
        data["max_length"],
    )
    assert (task["batch_size"] * task["accumulate"], task["steps"]) == (
        data["batch_size"],
        shipped["trainer"]["max_steps"],
    )
    assert (model["learning_rate"], "constant") == decide.RECIPE_POINT and model["momentum"] == 0.9

    def config(**extra: Any) -> dict[str, Any]:
        cell = decide.sgd_cell(decide.RECIPE_POINT, 8.0, 1, **extra)
        return decide.decide_config(cell, task, tmp_path)

    def callbacks(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {
            c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in cfg["trainer"]["callbacks"]
        }

    plain = config()
    assert plain["data"]["public_fraction"] == 0.05 and plain["data"]["data_seed"] == 0
    assert plain["model"]["optimizer"] == "sgd" and plain["seed_everything"] == 1
    assert set(callbacks(plain)) == {"PrivacyBudget"}
    assert config(data_seed=1)["data"]["data_seed"] == 1
    rldp = callbacks(config(controller="rldp"))["RLDPController"]
    shipped_rldp = shipped["trainer"]["callbacks"][1]["init_args"]
    assert rldp == {k: v for k, v in shipped_rldp.items() if k != "save_policy_to"}
    prior = callbacks(config(controller="rldp_prior"))["RLDPController"]
    assert prior["act"] == "deterministic" and prior["policy_path"] == "prior.zip"
    plateau = callbacks(config(controller="plateau"))["PlateauController"]
    assert (
        plateau
        == yaml.safe_load((ROOT / "configs" / "plateau.yaml").read_text())["trainer"]["callbacks"][0][
            "init_args"
        ]
    )
    trial = decide.decide_config(decide.sgd_cell((0.25, "linear"), 2.0, 0), task, tmp_path)
    assert callbacks(trial)["ClippedValidationLoss"] == {"bound": 8.0}
    assert trial["model"]["lr_schedule"] == "linear"


def test_seeds_differ_in_noise_and_batches_and_seed_0_keeps_its_hash(tmp_path: Path) -> None:
    decide, _ = _modules()
    from cells import config_hash

    def config(seed: int) -> dict[str, Any]:
        return decide.decide_config(
            decide.sgd_cell(decide.RECIPE_POINT, 8.0, seed), decide.FULL_TASK, tmp_path
        )

    # The strategy's seed draws the noise and the Poisson batches: a seed that left it at one value would vary
    # only the LoRA initialisation, and the spread over seeds would leave out the noise.
    assert [config(s)["trainer"]["strategy"]["init_args"]["seed"] for s in (0, 1, 2)] == [0, 1, 2]
    # Seed-0 cells finished while the strategy's seed was left at its default 0 ran the same run: same hash.
    legacy = config(0)
    del legacy["trainer"]["strategy"]["init_args"]["seed"]
    assert config_hash(config(0)) == config_hash(legacy)
    assert len({config_hash(config(s)) for s in (0, 1, 2)}) == 3


def test_the_prior_is_staged_by_content(tmp_path: Path) -> None:
    decide, _ = _modules()
    policy = tmp_path / "policy.zip"
    policy.write_bytes(b"prior one")
    first = decide.stage_policy(policy, tmp_path / "out")
    assert first == decide.stage_policy(policy, tmp_path / "out") and Path(first).read_bytes() == b"prior one"
    policy.write_bytes(b"prior two")  # retrained in place: new M7 configs, not the finished cells' ones
    assert decide.stage_policy(policy, tmp_path / "out") != first


# ------------------------------------------------------------------------------------------------ selection
GRID = ((0.25, "constant"), (0.5, "constant"), (0.25, "linear"), (0.5, "linear"))
PLAN = {"epsilons": [8.0], "grid": [list(p) for p in GRID], "k": 4, "seeds": [3, 5], "policy": None}


def _grid_rows(
    eps: float, seed: int, vals: list[float], tests: list[float], **cell: Any
) -> list[dict[str, Any]]:
    decide, _ = _modules()
    return [
        _row(decide.sgd_cell(p, eps, seed, **cell), v, t) for p, v, t in zip(GRID, vals, tests, strict=True)
    ]


def test_m2_picks_per_seed_on_validation_and_m1_is_the_lowest_constant_rate() -> None:
    decide, _ = _modules()
    rows = _grid_rows(8.0, 0, [3.0, 2.5, 2.9, 2.8], [1.0, 2.6, 2.0, 2.0])  # test favours another point
    rows += _grid_rows(8.0, 1, [3.0, 3.1, 2.9, 2.2], [3.0, 3.1, 2.9, 2.3])
    out = decide.outcome(rows, PLAN, 8.0)
    assert {s: r.point for s, r in out.results["M2"].items()} == {0: GRID[1], 1: GRID[3]}
    assert {s: r.ppl for s, r in out.results["M2"].items()} == {0: 2.6, 1: 2.3}
    assert {s: r.ppl for s, r in out.results["M1"].items()} == {0: 1.0, 1: 3.0}
    # an incomplete grid chooses nothing (a partial grid would flatter the oracle's seed)
    partial = decide.outcome(rows[:-1], PLAN, 8.0)
    assert set(partial.results["M2"]) == {0}


def test_m3_chooses_on_public_rows_and_falls_back_to_the_recipe() -> None:
    decide, _ = _modules()
    private = _grid_rows(8.0, 0, [2.0, 3.0, 3.0, 3.0], [2.0, 2.7, 2.8, 2.9])
    private += _grid_rows(8.0, 1, [2.0, 3.0, 3.0, 3.0], [2.1, 2.6, 2.8, 2.9])
    public = _grid_rows(8.0, 0, [4.0, 4.0, 3.5, 4.0], [9.0, 9.0, 9.0, 9.0], data_seed=1)
    out = decide.outcome(private + public, PLAN, 8.0)
    assert (out.public_point, out.public_fallback) == (GRID[2], False)
    assert {s: r.ppl for s, r in out.results["M3"].items()} == {0: 2.8, 1: 2.8}
    fallback = decide.outcome(private + public[:2], PLAN, 8.0)
    assert (fallback.public_point, fallback.public_fallback) == (decide.RECIPE_POINT, True)
    assert {s: r.ppl for s, r in fallback.results["M3"].items()} == {0: 2.7, 1: 2.6}
    assert {s: r.ppl for s, r in out.results["M2"].items()} == {0: 2.0, 1: 2.1}  # private validation only


def _trials(target: float, seed: int, scores: list[float], tests: list[float]) -> list[dict[str, Any]]:
    """M4's trials at target/4 with σ and ε as a run of the quick task would report them."""
    from dplightning.privacy.accounting import compute_epsilon, noise_for_target

    decide, _ = _modules()
    q = 32 / decide.train_size(decide.QUICK_TASK)
    sigma = noise_for_target(target / 4, 1e-5, q, 3)
    spent = compute_epsilon(sigma, q, 3, 1e-5)
    rows = _grid_rows(target / 4, seed, [3.0] * 4, tests)
    for row, score in zip(rows, scores, strict=True):
        row.update(sigma=sigma, steps=3, epsilon_spent=spent, clipped_val_loss=score, selection_examples=40)
    return rows


def test_m4_chooses_privately_and_spends_at_most_the_target() -> None:
    decide, _ = _modules()
    rows = _trials(8.0, 0, [5.0, 1.0, 5.0, 5.0], [3.0, 2.0, 3.0, 3.0])  # one trial far better: a clear choice
    out = decide.outcome(rows, PLAN, 8.0)
    choice = out.private[0]
    assert choice.result is not None and choice.result.point == GRID[1] and out.results["M4"][0].ppl == 2.0
    a = choice.account
    # the 4 trials at ε = 2 composed jointly cost far less than 4 × 2; the selection gets the rest
    assert 2.0 < a.trials_epsilon < 8.0 and a.total == pytest.approx(8.0) and a.total <= 8.0 + 1e-9
    # a trial whose reported ε the accountant does not reproduce stops the choice (the account would be wrong)
    rows[0]["epsilon_spent"] *= 0.5
    broken = decide.outcome(rows, PLAN, 8.0).private[0]
    assert broken.result is None and "reported" in broken.error
    assert decide.outcome(rows[:3], PLAN, 8.0).private[0].error == "trials missing"


def test_exponential_mechanism_draws_with_its_probabilities() -> None:
    selection = load_benchmark("private_selection")
    scores, eps, sens = [1.0, 1.2, 2.0], 2.0, 0.25
    rng = np.random.default_rng(0)
    draws = np.bincount(
        [selection.exponential_choice(scores, eps, sens, rng) for _ in range(20000)], minlength=3
    )
    logits = -eps * np.array(scores) / (2 * sens)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(draws / draws.sum(), expected, atol=0.015)
    uniform = [selection.exponential_choice(scores, 0.0, sens, rng) for _ in range(3000)]
    assert min(np.bincount(uniform, minlength=3)) > 850
    import torch

    clipped = selection.clip_losses(torch.tensor([float("nan"), float("inf"), 9.0, 2.0, -1.0]), 8.0)
    assert clipped.tolist() == [8.0, 8.0, 8.0, 2.0, 0.0]


# ------------------------------------------------------------------------------------------------ statistics
def test_paired_differences_and_targets() -> None:
    decide, _ = _modules()
    d = decide.paired_difference({0: 3.0, 1: 4.0, 2: 5.0, 7: 1.0}, {0: 2.0, 1: 2.0, 2: 2.0})
    assert (d.seeds, d.mean) == (3, pytest.approx(2.0))  # seed 7 has no pair
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) · sd / √n
    assert (d.low, d.high) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert decide.paired_difference({0: 1.0}, {0: 3.0}) == decide.Paired(1, -2.0, None, None)
    assert decide.ratio_target({0: 2.0}, {0: 2.02}, 1.01, False)[1] == "met"
    assert decide.ratio_target({0: 2.0, 1: 3.0}, {0: 2.0, 1: 2.0}, 1.01, False)[1] == "not met"
    assert decide.ratio_target({0: 2.0}, {0: 2.0}, 1.0, True)[1] == "not met"  # "M7 < M5" is strict
    assert decide.ratio_target({0: 2.0}, {1: 2.0}, 1.0, True) == ("–", "–")


def test_report_from_synthetic_rows_states_every_method_and_target(tmp_path: Path) -> None:
    decide, sweep = _modules()
    rows = _grid_rows(8.0, 0, [3.0, 2.5, 2.9, 2.8], [3.0, 2.6, 2.9, 2.8])
    rows += _grid_rows(8.0, 1, [3.0, 2.4, 2.9, 2.8], [3.0, 2.5, 2.9, 2.8])
    rows += _trials(8.0, 0, [1.2, 1.0, 1.1, 1.3], [3.1, 2.9, 3.0, 3.2])
    for seed, ppl in ((0, 2.3), (1, 2.2)):
        rows.append(_row(decide.sgd_cell(decide.RECIPE_POINT, 8.0, seed, controller="rldp_prior"), 2.3, ppl))
        rows.append(_row(decide.sgd_cell(decide.RECIPE_POINT, 8.0, seed, controller="plateau"), 2.6, 2.6))
    for r in rows:
        r.setdefault("sigma", 0.5)
        r.setdefault("epsilon_spent", r["settings"]["epsilon"] - 0.01)
        r.update(steps=3, sigma_over_batch=0.01, fit_wall_s=1.0, threads=1, loadavg_before=[0.0] * 3)
        r.update(loadavg_after=[0.0] * 3, command="cmd", status="ok")
    (tmp_path / sweep.JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / decide.PLAN).write_text(json.dumps({**PLAN, "policy": "p.zip"}))
    text = decide.report(tmp_path).read_text()
    for method in ("M1", "M2", "M3", "M4", "M5", "M6", "M7", "adamw"):
        assert f"| {method} |" in text
    assert "| M7 − min(M2, M3) | 2 |" in text and "M7 ≤ M1 − 20 % | ratio of means" in text
    assert "M7 < M5 | ratio of means" in text and "| met |" in text
    assert "ε spent ≤ target in every one of" in text and "stands in for their choice" in text
    # Against their own starting point (the grid cell at the recipe's rate, same seed: test 2.6 and 2.5).
    assert "| M7 − start | 2 | -0.3000 |" in text and "| M5 − start | 2 | +0.0500 |" in text


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_quick_run_resumes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    decide, sweep = _modules()
    assert decide.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "M7 (RLDP from the prior policy): skipped" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / sweep.JSONL).read_text().splitlines()]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    for r in rows:
        s = r["settings"]
        assert 0 < r["epsilon_spent"] <= s["epsilon"] * (1 + 1e-9) and r["steps"] == 3
    assert {r["settings"].get("controller") for r in rows} == {None, "rldp", "plateau"}
    trial = next(r for r in rows if r["settings"]["epsilon"] == 8.0 / decide.K_TRIALS)  # M4 at ε/k
    assert 0 < trial["clipped_val_loss"] <= 8.0 and trial["selection_examples"] == 40
    rldp = next(r for r in rows if r["settings"].get("controller") == "rldp")
    assert rldp["epsilon_spent"] <= 8.0 * (1 + 1e-9)
    readme = (tmp_path / "README.md").read_text()
    method_rows = {line.split(" | ")[0][2:]: line for line in readme.splitlines() if line.startswith("| M")}
    for method in ("M1", "M2", "M3", "M4", "M5", "M6"):
        assert "(1 seed)" in method_rows[method], method_rows[method]
    assert "M7 not run" in readme and "| 0 | 1 |" in readme  # M4's account row for seed 0: one trial
    assert "ε spent ≤ target in every one of the 4 private cells" in readme
    assert "## Trajectories" in readme and (tmp_path / "trajectories_eps8_s0.png").stat().st_size > 1000

    assert decide.main(["--quick", "--out", str(tmp_path)]) == 0  # resumable: nothing reruns
    assert capsys.readouterr().out.count("done already") == 4
    assert len((tmp_path / sweep.JSONL).read_text().splitlines()) == 4


def test_only_names_cells_of_the_plan(tmp_path: Path) -> None:
    decide, _ = _modules()
    with pytest.raises(SystemExit, match="no such cell in this plan: not_a_cell"):
        decide.main(["--quick", "--out", str(tmp_path), "--only", "not_a_cell"])
