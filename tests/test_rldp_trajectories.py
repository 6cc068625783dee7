"""The trajectory plots of the RLDP decision cells: effective step size lr·C relative to the recipe, σ and C,
read back from TensorBoard logs written as the cells write them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import load_benchmark


def _write(logdir: Path, scalars: dict[str, dict[int, float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir))
    for tag, points in scalars.items():
        for step, value in points.items():
            writer.add_scalar(tag, value, step)
    writer.close()


def _row(cell: str, steps: int, **settings: Any) -> dict[str, Any]:
    base = {"kind": "dpsgd", "optimizer": "sgd", "momentum": 0.9, "clip": 1.0, "epsilon": 8.0, "seed": 0}
    return {"cell": cell, "status": "ok", "steps": steps, "settings": {**base, **settings}}


def test_each_control_moves_the_effective_step_size_as_it_should(tmp_path: Path) -> None:
    traj = load_benchmark("rldp_trajectories")
    steps = 6
    flat = {k: 1.0 for k in range(1, steps + 1)}
    sigma = {k: 0.5 for k in range(1, steps + 1)}
    # RLDP: C × 1.5 from the 3rd step on (logged after each step, so at global step 3 for step index 2)
    rldp_clip = {k: (1.5 if k >= 3 else 1.0) for k in range(1, steps + 1)}
    rldp_sigma = {k: (0.6 if k >= 3 else 0.5) for k in range(1, steps + 1)}
    _write(tmp_path / "tb" / "plain", {"privacy/clip_norm": flat, "privacy/noise_multiplier": sigma})
    _write(
        tmp_path / "tb" / "plateau",
        {"privacy/clip_norm": flat, "privacy/noise_multiplier": sigma, "controller/lr": {4: 0.25}},
    )
    _write(tmp_path / "tb" / "rldp", {"privacy/clip_norm": rldp_clip, "privacy/noise_multiplier": rldp_sigma})
    rows = [
        _row("plain", steps, lr=0.5),
        _row("plateau", steps, lr=0.5, controller="plateau"),
        _row("rldp", steps, lr=0.5, controller="rldp"),
        _row("other_seed", steps, lr=0.5, controller="rldp", seed=1),
        _row("public", steps, lr=0.5, controller="rldp", data_seed=1),
    ]
    chosen = traj.cells_to_plot(rows, 8.0, 0)
    assert [r["cell"] for _, r in chosen] == ["plain", "plateau", "rldp"]

    by_cell = {
        row["cell"]: traj.trajectory(
            label, row["settings"], traj.read_scalars(tmp_path / "tb" / row["cell"]), steps
        )
        for label, row in chosen
    }
    assert list(by_cell["plain"].step_size.values()) == [1.0] * steps
    assert list(by_cell["plateau"].step_size.values()) == [1.0] * 4 + [0.5] * 2  # lr halved from step 4 on
    assert list(by_cell["rldp"].step_size.values()) == [1.0, 1.0, 1.5, 1.5, 1.5, 1.5]
    assert list(by_cell["rldp"].sigma.values()) == pytest.approx([0.5, 0.5, 0.6, 0.6, 0.6, 0.6])

    linear = traj.learning_rates({"lr": 0.5, "schedule": "linear"}, {}, 4)
    assert linear == {0: 0.5, 1: 0.375, 2: 0.25, 3: 0.125}

    path = traj.write_plot(tmp_path, rows, 8.0, 0)
    assert path == tmp_path / "trajectories_eps8_s0.png" and path.stat().st_size > 1000
    assert traj.write_plot(tmp_path, rows, 2.0, 0) is None  # no controller cell at ε = 2

    # the logs are not committed: a later report redraws from the copied tags alone
    import shutil

    shutil.rmtree(tmp_path / "tb")
    path.unlink()
    assert sorted(p.name for p in (tmp_path / "trajectories").iterdir()) == [
        "plain.json",
        "plateau.json",
        "rldp.json",
    ]
    assert traj.cell_scalars(tmp_path, "plateau")["controller/lr"] == {4: 0.25}
    assert traj.write_plot(tmp_path, rows, 8.0, 0) == path and path.stat().st_size > 1000
    # neither logs nor copies: the PNG drawn earlier stays linked; without it, nothing
    shutil.rmtree(tmp_path / "trajectories")
    assert traj.write_plot(tmp_path, rows, 8.0, 0) == path
    path.unlink()
    assert traj.write_plot(tmp_path, rows, 8.0, 0) is None


def test_a_cell_without_privacy_scalars_is_an_error_naming_it(tmp_path: Path) -> None:
    traj = load_benchmark("rldp_trajectories")
    _write(tmp_path / "tb" / "x", {"val/loss": {1: 2.0}})
    with pytest.raises(ValueError, match="rldp: no privacy/clip_norm"):
        traj.trajectory("rldp", {"lr": 0.5}, traj.read_scalars(tmp_path / "tb" / "x"), 3)
