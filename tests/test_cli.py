"""The `dplightning` command: fit on the tiny config with a summary; bad input ends in one error line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_dplightning

from dplightning.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fit_tiny_config_prints_summary_and_writes_tensorboard(tmp_path: Path) -> None:
    out = run_dplightning(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "== dplightning summary ==" in out.stdout
    assert "steps: 4" in out.stdout
    assert "final val perplexity" in out.stdout
    assert "ε = " in out.stdout
    events = list((tmp_path / "runs" / "tiny").rglob("events.out.tfevents.*"))
    assert events


@pytest.mark.parametrize(
    ("yaml", "expected"),
    [
        ("model:\n  model_name: tiny-llama\n  bogus_key: 1\n", "bogus_key"),
        (
            "model:\n  model_name: tiny-llama\n  lora_target_modules: [c_attn]\ntrainer:\n  max_steps: 1\n",
            "lora_target_modules",
        ),
        (
            "model:\n  model_name: tiny-llama\ndata:\n  dataset: /nonexistent/notes.txt\ntrainer:\n  max_steps: 1\n",
            "/nonexistent/notes.txt",
        ),
        ("model:\n  model_name: /nonexistent/model\n", "/nonexistent/model"),
    ],
)
def test_bad_input_is_one_clear_error_line(tmp_path: Path, yaml: str, expected: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml)
    out = run_dplightning(["fit", "--config", str(cfg), "--trainer.logger", "false"], cwd=tmp_path)
    err = out.stderr
    assert out.returncode == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0]
    assert "Traceback" not in err


def test_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--config", "/nonexistent/cfg.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_impossible_budget_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "budget.yaml"
    cfg.write_text(
        "model:\n  model_name: tiny-llama\ndata:\n  tokenizer: tiny-llama\n  num_records: 100\n  max_length: 16\n"
        "trainer:\n  max_steps: 3\n  logger: false\n  enable_checkpointing: false\n  strategy:\n"
        "    class_path: dplightning.strategies.DPSGDStrategy\n    init_args:\n      noise_multiplier: 0.2\n"
        "      target_epsilon: 0.05\n      device: cpu\n"
    )
    assert main(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "target" in err
