"""Two gloo processes under DDP produce exactly the single-process DP-SGD update, also under bf16 autocast."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dplightning.privacy.discretization import from_grid

SCRIPT = Path(__file__).parent / "scripts" / "ddp_run.py"


def _launch(out: Path, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _run(out: Path, devices: int, noise: float) -> dict[str, torch.Tensor]:
    _launch(out, "--devices", str(devices), "--noise", str(noise))
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("noise", [0.0, 0.7])
def test_two_process_ddp_matches_single_process(tmp_path: Path, noise: float) -> None:
    single = _run(tmp_path / "single.pt", 1, noise)
    ddp = _run(tmp_path / "ddp.pt", 2, noise)
    assert set(single) == set(ddp)
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-5, rtol=1e-5, msg=name)
    # and training did something: every parameter moved away from where it started
    trained = [name for name in single if not name.startswith("initial.") and name != "epsilon"]
    assert trained
    for name in trained:
        assert not torch.allclose(single[name], single[f"initial.{name}"]), name


@pytest.mark.slow
def test_two_process_ddp_under_bf16_mixed_releases_grid_integers_and_keeps_ranks_equal(
    tmp_path: Path,
) -> None:
    """LoRA on the tiny Llama, 2 gloo ranks, ``precision="bf16-mixed"``, σ calibrated to ε = 8 over 3 steps."""
    out, target, steps = tmp_path / "bf16.pt", 8.0, 3
    _launch(
        out,
        *("--devices", "2", "--model", "tiny-llama", "--precision", "bf16-mixed"),
        *("--steps", str(steps), "--target-epsilon", str(target)),
    )
    runs: list[dict[str, Any]] = [torch.load(f"{out}.rank{r}", weights_only=False) for r in (0, 1)]
    for rank, run in enumerate(runs):
        assert (run["rank"], run["world_size"]) == (rank, 2)
        assert run["precision"] == "bf16-mixed"
        assert run["autocast"] and all(run["autocast"])  # the forwards did run under bf16 autocast
        assert run["accountant_steps"] == steps and len(run["steps"]) == steps
        assert 0 < run["epsilon"] <= target
    first, second = runs
    assert first["epsilon"] == second["epsilon"]
    noise: list[torch.Tensor] = []
    for one, two in zip(first["steps"], second["steps"]):
        assert one["expected_batch_size"] == two["expected_batch_size"] == 16
        # per-example clipping held under bf16: the reduced sum of the step's b examples has norm ≤ b·C
        examples = one["examples"] + two["examples"]
        norm = math.sqrt(
            sum(float(from_grid(s, one["grid"][n]).pow(2).sum()) for n, s in one["sums"].items())
        )
        assert norm <= examples * one["clip_norm"] * (1 + 1e-9)
        for name, released in one["released"].items():
            sums, grid = one["sums"][name], one["grid"][name]
            assert sums.dtype == torch.int64  # clipped sums are exact integers on the grid
            assert released.dtype == torch.float64 and torch.isfinite(released).all()
            assert torch.equal(released, released.round()), name  # release = integer sum + discrete noise
            # both ranks hold the same reduced sums and release the same numbers: noise enters once
            assert torch.equal(sums, two["sums"][name]), name
            assert torch.equal(released, two["released"][name]), name
            grad = one["grad"][name]
            assert grad.dtype == torch.float32  # the optimizer sees float32, whatever the autocast dtype
            expected = (from_grid(released, grid) / one["expected_batch_size"]).float()
            assert torch.equal(grad, expected) and torch.equal(two["grad"][name], expected), name
            noise.append((released - sums.double()).flatten() / one["noise_std_units"][name])
    # the noise is the calibrated discrete Gaussian (std σC/γ in grid units), added once, not once per rank
    assert 0.9 < float(torch.cat(noise).std()) < 1.1
    assert set(first["final"]) == set(first["initial"]) and first["final"]
    for name, weight in first["final"].items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight, second["final"][name]), name  # the ranks end with identical LoRA weights
        assert not torch.equal(weight, first["initial"][name]), name  # and training moved every one
