"""Two gloo processes under DDP produce exactly the single-process DP-SGD update."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_run.py"


def _run(out: Path, devices: int, noise: float) -> dict[str, torch.Tensor]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--devices", str(devices), "--noise", str(noise)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
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
