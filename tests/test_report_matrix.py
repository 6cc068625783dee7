"""The matrix report (``benchmarks/report_matrix.py``) on synthetic rows: its arithmetic (gap closed, steps to
reach DP-SGD's final validation perplexity), its target and audit-power verdicts, the tuning table's mark, and a
README without exception for any subset of finished cells, none included."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import load_benchmark

TASK: dict[str, Any] = {
    "model": "tiny-llama",
    "num_records": 400,
    "public_fraction": 0.05,
    "data_seed": 0,
    "max_length": 32,
    "batch_size": 16,
    "accumulate": 1,
    "steps": 30,
    "precision": "bf16-mixed",
}
STEPS = 30


@pytest.fixture(scope="module")
def rm() -> ModuleType:
    return load_benchmark("report_matrix")


def _row(
    cell: str,
    method: str,
    *,
    role: str = "grid",
    eps: float | None = None,
    seed: int | None = 0,
    test: float = 100.0,
    curve: list[list[float]] | None = None,
    steps: int = STEPS,
    settings: dict[str, Any] | None = None,
    **figures: Any,
) -> dict[str, Any]:
    """One ok row as ``recipe_sweep.run_one`` writes it (the fields the report reads)."""
    s: dict[str, Any] = {
        "role": role,
        "method": method,
        "name": cell,
        "expected_batch": 16,
        **(settings or {}),
    }
    if eps is not None:
        s["epsilon"] = eps
    if seed is not None:
        s["seed"] = seed
    curve = curve or [[0, 200.0], [steps, test]]
    return {
        "cell": cell,
        "status": "ok",
        "task": TASK,
        "command": ".venv/bin/python benchmarks/run_matrix.py --test",
        "settings": s,
        "steps": steps,
        "test_perplexity_after": test,
        "val_perplexity_after": curve[-1][1],
        "val_curve": curve,
        "fit_wall_s": 60.0,
        "peak_rss_mb": 700.0,
        "sigma": None if eps is None else 1.0,
        "sigma_over_batch": None if eps is None else 1.0 / 16,
        "epsilon_spent": None if eps is None else 0.99 * eps,
        "delta": None if eps is None else 1e-5,
        **figures,
    }


# what _plan's tuned choices give each method's cells (a row with other settings is left out as stale)
TUNED: dict[str, dict[str, Any]] = {
    "pretrained": {},
    "nonprivate": {"lr": 0.01},
    "dpsgd_flat": {"lr": 0.5, "schedule": "constant", "fallback": False},
    "rldp": {"lr": 0.5, "schedule": "constant", "controller": "rldp_prior"},
}


def _grid(method: str, eps: float | None, seed: int, test: float, **kwargs: Any) -> dict[str, Any]:
    name = f"{method}_eps{'inf' if eps is None else f'{eps:g}'}_s{seed}"
    settings = dict(kwargs.pop("settings", {}))
    if method in TUNED:
        run_matrix = load_benchmark("run_matrix")
        cell = run_matrix.method_cell(method, TUNED[method], eps, seed)
        settings = {**{k: v for k, v in cell.items() if k not in ("kind", "epsilon", "seed")}, **settings}
    return _row(name, method, eps=eps, seed=seed, test=test, settings=settings, **kwargs)


def _references(nonprivate: dict[int, float], base: float = 100.0) -> list[dict[str, Any]]:
    rows = [_row("pretrained", "pretrained", seed=None, test=base, steps=0, curve=[[0, base]])]
    return rows + [_grid("nonprivate", None, s, ppl) for s, ppl in nonprivate.items()]


def _plan(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    plan: dict[str, Any] = {
        "methods": ["pretrained", "nonprivate", "dpsgd_flat", "rldp"],
        "epsilons": [8.0],
        "low_epsilon": None,
        "seeds": [0, 1, 2],
        "tuning": {},
        "tuned": TUNED,
        "timing": None,
        "policy": "runs/prior.zip",
        "decide_out": str(tmp_path / "decide"),
        "quick": False,
    }
    return {**plan, **changes}


def _write(out: Path, rows: list[dict[str, Any]], plan: dict[str, Any] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe_sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if plan is not None:
        (out / "plan.json").write_text(json.dumps(plan))


def _results(rm: ModuleType, tmp_path: Path, rows: list[dict[str, Any]]) -> Any:
    _write(tmp_path, rows, None)
    return rm.load_results(tmp_path, {})


def _line(readme: str, start: str) -> str:
    return next(line for line in readme.splitlines() if line.startswith(start))


def test_gap_closed_against_the_same_seeds_nonprivate_else_their_mean(rm: ModuleType, tmp_path: Path) -> None:
    base, nonprivate = 100.0, {0: 50.0, 1: 25.0}  # no non-private cell of seed 2: the mean, 37.5
    rows = [
        *_references(nonprivate, base),
        _grid("dpsgd_flat", 8.0, 0, math.sqrt(100.0 * 50.0)),  # half of seed 0's log gap
        _grid("dpsgd_flat", 8.0, 1, 25.0),  # all of seed 1's
        _grid("dpsgd_flat", 8.0, 2, 100.0 * 0.375**0.25),  # a quarter of the gap to the mean
    ]
    results = _results(rm, tmp_path, rows)
    gaps = rm.gap_closed_by_seed(
        rm.by_seed(results, "dpsgd_flat", 8.0),
        rm.base_perplexity(results),
        rm.nonprivate_perplexities(results),
    )
    assert gaps == pytest.approx({0: 0.5, 1: 1.0, 2: 0.25})
    assert rm.gap_closed_by_seed(rm.by_seed(results, "pretrained", 8.0), base, nonprivate) == {None: 0.0}

    _write(tmp_path, rows, _plan(tmp_path))
    readme = rm.report(tmp_path).read_text()
    expected = f"{statistics.mean([0.5, 1.0, 0.25]):.1%} ± {statistics.stdev([0.5, 1.0, 0.25]):.1%}"
    assert expected in _line(readme, "| dpsgd_flat | 3/3 |")
    assert "| nonprivate | 2/3 |" in readme and "100.0% ± 0.0%" in _line(readme, "| nonprivate |")


def test_rldp_vs_dpsgd_is_met_when_better_on_every_seed_and_not_met_when_worse(
    rm: ModuleType, tmp_path: Path
) -> None:
    flat = [_grid("dpsgd_flat", 8.0, s, 10.0) for s in (0, 1, 2)]

    def target(rldp_ppl: float, seeds: tuple[int, ...] = (0, 1, 2)) -> Any:
        rldp = [_grid("rldp", 8.0, s, rldp_ppl) for s in seeds]
        return rm.perplexity_target(_results(rm, tmp_path, [*flat, *rldp]), 8.0)

    better = target(9.0)
    assert better.status == "met"
    assert "mean -10.00% over 3 seeds" in better.figures and "s2 -10.00%" in better.figures
    assert target(11.0).status == "not met"
    assert target(9.0, seeds=(3,)).status == "not yet run"  # no seed with both cells
    assert rm.perplexity_target(_results(rm, tmp_path, flat), 2.0).status == "not yet run"


def test_steps_to_reach_interpolates_between_validations(rm: ModuleType, tmp_path: Path) -> None:
    curve = [[0, 100.0], [10, 80.0], [20, 60.0], [30, 50.0]]
    assert rm.steps_to_reach(curve, 70.0) == pytest.approx(
        15.0
    )  # halfway between the validations at 10 and 20
    assert rm.steps_to_reach(curve, 80.0) == pytest.approx(10.0)
    assert rm.steps_to_reach(curve, 120.0) == 0.0
    assert rm.steps_to_reach(curve, 40.0) is None

    flat = _grid("dpsgd_flat", 8.0, 0, 10.0, curve=[[0, 100.0], [15, 75.0], [30, 70.0]])
    rldp = _grid("rldp", 8.0, 0, 9.0, curve=curve)
    assert rm.reach_fraction(rldp, flat) == pytest.approx(0.5)
    reached = rm.speed_target(_results(rm, tmp_path, [flat, rldp]), 8.0)
    assert reached.status == "met" and "s0 50% (step 15.0 of 30)" in reached.figures

    slow = _grid("rldp", 8.0, 0, 9.0, curve=[[0, 100.0], [10, 90.0], [20, 80.0], [30, 60.0]])  # 70 at step 25
    assert rm.speed_target(_results(rm, tmp_path, [flat, slow]), 8.0).status == "not met"
    never = _grid("rldp", 8.0, 0, 9.0, curve=[[0, 100.0], [30, 71.0]])
    stalled = rm.speed_target(_results(rm, tmp_path, [flat, never]), 8.0)
    assert stalled.status == "not met" and "never reached" in stalled.figures


def test_audit_targets_judge_the_paired_difference_against_its_noise(rm: ModuleType, tmp_path: Path) -> None:
    audit = {"mia_auc_se": 0.01, "canary_exposure_not_inserted": 1.0}
    flat = _grid("dpsgd_flat", 8.0, 0, 10.0, mia_auc=0.50, canary_exposure=1.0, **audit)
    close = _grid(
        "rldp", 8.0, 0, 9.0, mia_auc=0.515, canary_exposure=0.5, **audit
    )  # 0.015 ≤ 2·0.01 (one seed)
    leaky = _grid("rldp", 8.0, 0, 9.0, mia_auc=0.60, canary_exposure=3.0, **audit)
    assert rm.auc_target(_results(rm, tmp_path, [flat, close]), 8.0).status == "met"
    assert rm.exposure_target(_results(rm, tmp_path, [flat, close]), 8.0).status == "met"
    assert rm.auc_target(_results(rm, tmp_path, [flat, leaky]), 8.0).status == "not met"
    assert rm.exposure_target(_results(rm, tmp_path, [flat, leaky]), 8.0).status == "not met"
    unaudited = _grid("rldp", 8.0, 0, 9.0)
    assert rm.auc_target(_results(rm, tmp_path, [flat, unaudited]), 8.0).status == "not measured"


def test_an_empty_results_directory_gives_a_readme(rm: ModuleType, tmp_path: Path) -> None:
    readme = rm.report(tmp_path / "nothing").read_text()
    assert "Nothing has finished yet" in readme and "no `plan.json`" in readme
    failed = {
        **_row("tune_nonprivate_lr0.01", "nonprivate", role="tune"),
        "status": "failed",
        "error": "boom",
    }
    _write(tmp_path / "failed", [failed], _plan(tmp_path))
    readme = rm.report(tmp_path / "failed").read_text()
    assert (
        "Nothing has finished yet" in readme
        and "Failed (rerun by the next invocation): tune_nonprivate" in readme
    )
    assert not list((tmp_path / "failed").glob("*.png"))
    # tuning cells finished, no plan yet: they are listed, nothing is chosen
    _write(tmp_path / "tuning", [_row("tune_nonprivate_lr0.01", "nonprivate", role="tune")], None)
    readme = rm.report(tmp_path / "tuning").read_text()
    assert "No `plan.json` yet" in readme and _line(readme, "| nonprivate | tune_nonprivate_lr0.01 |")


def _tuning_rows() -> list[dict[str, Any]]:
    return [
        _row("tune_nonprivate_lr0.005", "nonprivate", role="tune", settings={"lr": 0.005, "data_seed": 1}),
        _row("tune_nonprivate_lr0.01", "nonprivate", role="tune", settings={"lr": 0.01, "data_seed": 1}),
    ]


def _decide_rows() -> list[dict[str, Any]]:
    """rldp_decide.py's rows: two public points of the grid, and two cells that are not dpsgd_flat's tuning."""
    base = {"kind": "dpsgd", "optimizer": "sgd", "epsilon": 8.0, "seed": 0, "data_seed": 1}
    rows = []
    for name, extra in (
        ("public_lr0.25", {"lr": 0.25}),
        ("public_lr0.5", {"lr": 0.5}),
        ("public_rldp", {"lr": 0.5, "controller": "rldp"}),
        ("private_lr0.5", {"lr": 0.5, "data_seed": 0}),
    ):
        row = _row(name, "", settings={**base, **extra})
        del row["settings"]["role"], row["settings"]["method"]
        rows.append(row)
    return rows


def test_the_tuning_table_marks_the_chosen_setting(rm: ModuleType, tmp_path: Path) -> None:
    _write(tmp_path / "decide", _decide_rows(), None)
    _write(tmp_path, _tuning_rows(), _plan(tmp_path))
    readme = rm.report(tmp_path).read_text()
    assert _line(readme, "| nonprivate | tune_nonprivate_lr0.01 |").endswith("| ✓ |")
    assert _line(readme, "| nonprivate | tune_nonprivate_lr0.005 |").endswith("|  |")
    assert _line(readme, "| dpsgd_flat | public_lr0.5 |").endswith("| ✓ |")
    assert _line(readme, "| dpsgd_flat | public_lr0.25 |").endswith("|  |")
    assert "public_rldp" not in readme and "private_lr0.5" not in readme
    assert "No `plan.json`" not in readme and "RLDP from the pre-trained prior" in readme

    tuned = {**_plan(tmp_path)["tuned"], "dpsgd_flat": {"lr": 0.5, "schedule": "constant", "fallback": True}}
    _write(tmp_path, _tuning_rows(), _plan(tmp_path, tuned=tuned))
    readme = rm.report(tmp_path).read_text()
    assert "public tuning cells were missing, so the recipe's point (lr 0.5 constant) is used" in readme
    assert _line(readme, "| dpsgd_flat | public_lr0.5 |").endswith("|  |")  # the fallback chose nothing


@pytest.mark.parametrize(
    ("auc", "se", "verdict"),
    [(0.9, 0.01, "the attack finds the control's members: AUC 0.900 ± 0.010"), (0.5, 0.05, "no power")],
)
def test_the_audit_power_verdict_follows_the_controls_auc(
    rm: ModuleType, tmp_path: Path, auc: float, se: float, verdict: str
) -> None:
    control = _row("control_memorise_s0", "control_memorise", role="control", mia_auc=auc, mia_auc_se=se)
    _write(tmp_path, [*_references({0: 50.0}), control], _plan(tmp_path))
    readme = rm.report(tmp_path).read_text()
    assert verdict in _line(readme, "Verdict:")


def _trajectory_copy(out: Path, cell: str, clip: dict[int, float], sigma: dict[int, float]) -> None:
    """The TensorBoard tags of a cell as rldp_trajectories.cell_scalars copies them (the logs are not kept)."""
    tags = {"privacy/clip_norm": clip, "privacy/noise_multiplier": sigma}
    path = out / "trajectories" / f"{cell}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({t: {str(k): v for k, v in s.items()} for t, s in tags.items()}))


def test_a_full_grid_and_a_partial_one_report_every_section(rm: ModuleType, tmp_path: Path) -> None:
    audit = {
        "mia_auc": 0.51,
        "mia_auc_se": 0.01,
        "mia_reference_auc": 0.5,
        "mia_reference_auc_se": 0.01,
        "mia_tpr_at_1pct_fpr": 0.01,
        "mia_reference_tpr_at_1pct_fpr": 0.01,
        "canary_exposure": 1.0,
        "canary_exposure_r8": 2.0,
        "canary_exposure_not_inserted": 1.0,
        "empirical_epsilon_lower_bound": 0.1,
    }
    private = {"dpsgd_flat": 60.0, "rldp": 55.0, "dpzo_gaussian": 80.0, "dpzo_laplace": 90.0}
    rows = _references({0: 50.0, 1: 50.0, 2: 50.0})
    for seed in (0, 1, 2):
        for eps in (8.0, 2.0, 0.5):
            for method, ppl in private.items():
                if eps == 0.5 and method.startswith("dpzo"):
                    continue
                ppl_s = ppl + 10.0 / eps + seed
                rows.append(_grid(method, eps, seed, ppl_s, settings={"lr": 0.5}, **audit))
    rows.append(_row("control_memorise_s0", "control_memorise", role="control", mia_auc=0.9, mia_auc_se=0.01))
    timing = {"dpsgd_batch_s": [0.2], "dpzo_batch_s": [0.1], "ratio": 2.0, "dpsgd_steps": 30, "zo_steps": 60}
    plan = _plan(
        tmp_path,
        methods=["pretrained", "nonprivate", *private],
        epsilons=[8.0, 2.0],
        low_epsilon=0.5,
        timing=timing,
    )
    _trajectory_copy(tmp_path, "rldp_eps8_s0", {1: 1.0, 2: 1.5, 3: 1.5}, {1: 0.5, 2: 0.6, 3: 0.6})
    _trajectory_copy(tmp_path, "dpsgd_flat_eps8_s0", {1: 1.0}, {1: 0.5})
    _write(tmp_path, rows, plan)
    readme = rm.report(tmp_path).read_text()

    assert "DP-ZO's steps: 60 = round(30 × 2.000)" in readme and "equal wall-clock" in readme.lower()
    for heading in ("## ε = 8", "## ε = 2", "## ε = 0.5 (low ε", "## Targets", "## Audit power", "## Plots"):
        assert heading in readme
    assert "| 8 | rldp 57.250 (3) < dpsgd_flat 62.250 (3)" in readme  # mean over seeds 0..2 of ppl + 10/ε + s
    assert readme.count("| met |") >= 3 and "proxy only" in readme
    assert "finds the control's members" in readme
    for png in (
        "test_perplexity_vs_epsilon.png",
        "validation_vs_step.png",
        "validation_vs_wallclock.png",
        "trajectories_eps8_s0.png",
    ):
        assert f"]({png})" in readme and (tmp_path / png).stat().st_size > 1000
    assert "trajectories_eps2_s0.png" not in readme  # no logs of the ε = 2 cells

    # an interrupted grid: seed 2 of RLDP at ε = 2 and every DP-ZO cell missing, the control not run
    kept = [r for r in rows if not (r["cell"] == "rldp_eps2_s2" or r["cell"].startswith(("dpzo", "control")))]
    _write(tmp_path, kept, plan)
    readme = rm.report(tmp_path).read_text()
    assert "| dpzo_gaussian | 0/3 | not yet run |" in readme
    assert "mean" in _line(readme, "| 2 | (a)") and "over 2 seeds" in _line(readme, "| 2 | (a)")
    assert "has not run yet" in _line(readme, "Verdict:")


def _downstream(method: str, seed: int | None, accuracy: float, eps: float | None = 2.0) -> dict[str, Any]:
    name = f"downstream_{method}_s{seed}"
    row = _row(name, method, role="downstream", eps=eps, seed=seed, downstream_accuracy=accuracy)
    row["downstream_majority_rate"] = 0.49
    row["task"] = {**TASK, "max_length": 128, "downstream_notes": 500}
    return row


@pytest.mark.parametrize(
    ("zo", "laplace", "expected"),
    [
        ((0.55, 0.57, 0.53), (0.50, 0.52), ("met", "met")),  # within 5 points; Laplace 7 points above base
        (
            (0.45, 0.47, 0.46),
            (0.44, 0.46),
            ("not met", "not met"),
        ),  # 10 points behind; Laplace within base's SE
    ],
)
def test_downstream_block_judges_dp_zo_against_dp_sgd_and_the_base_model(
    rm: ModuleType,
    tmp_path: Path,
    zo: tuple[float, ...],
    laplace: tuple[float, ...],
    expected: tuple[str, str],
) -> None:
    rows = [_downstream("pretrained", None, 0.44, eps=None), _row("pretrained", "pretrained", seed=None)]
    rows += [_downstream("dpsgd_flat", s, acc) for s, acc in enumerate((0.56, 0.58, 0.54))]
    rows += [_downstream("dpzo_gaussian", s, acc) for s, acc in enumerate(zo)]
    rows += [_downstream("dpzo_laplace", s, acc) for s, acc in enumerate(laplace)]
    (tmp_path / "recipe_sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = {"task": TASK, "downstream": {"task": rows[0]["task"], "timing": None}, "epsilons": [8.0]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    readme = rm.report(tmp_path).read_text()
    section = readme[readme.index("## Downstream block") :]
    zo_line = next(line for line in section.splitlines() if "DP-ZO Gaussian's downstream accuracy" in line)
    laplace_line = next(line for line in section.splitlines() if "clearly above the base model" in line)
    assert zo_line.endswith(f"| {expected[0]} |") and laplace_line.endswith(f"| {expected[1]} |")
    assert "| dpsgd_flat | 3 | 56.0%" in section  # mean of 56, 58, 54


def test_a_row_run_with_settings_the_plan_no_longer_chooses_is_left_out(
    rm: ModuleType, tmp_path: Path
) -> None:
    """An RLDP row run online (or with an old learning rate) is not paired with the prior's under its label."""
    rows = [
        *_references({0: 50.0}),
        _grid("dpsgd_flat", 8.0, 0, 60.0),
        _grid("dpsgd_flat", 8.0, 1, 60.0, settings={"lr": 0.25}),  # an earlier choice
        _grid("rldp", 8.0, 0, 55.0),
        _grid("rldp", 8.0, 1, 40.0, settings={"controller": "rldp"}),  # online, not from the prior
    ]
    _write(tmp_path, rows, _plan(tmp_path))
    plan = json.loads((tmp_path / "plan.json").read_text())
    results = rm.load_results(tmp_path, plan)
    assert set(results.grid) == {
        ("pretrained", None, None),
        ("nonprivate", None, 0),
        ("dpsgd_flat", 8.0, 0),
        ("rldp", 8.0, 0),
    }
    assert results.left_out == 2
    assert [s for s, _, _ in rm.paired(results, 8.0)] == [0]
