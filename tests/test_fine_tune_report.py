"""FineTuneReport (generated note before/after, gap closed against stored references) and the summary lines
that it and DownstreamAccuracy hand to ``dplightning fit``."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest

from dplightning.callbacks import DownstreamAccuracy, FineTuneReport
from dplightning.data import TextDataModule
from dplightning.errors import DPLightningError
from dplightning.module import DPLoRAModule
from dplightning.strategies import DPSGDStrategy

ROOT = Path(__file__).resolve().parents[1]


def _fit(callbacks: list[pl.Callback], learning_rate: float = 0.05) -> tuple[pl.Trainer, DPLoRAModule]:
    data = TextDataModule(
        tokenizer="tiny-llama", num_records=80, max_length=64, batch_size=16, qa_fraction=1.0
    )
    model = DPLoRAModule(model_name="tiny-llama", lora_rank=4, learning_rate=learning_rate, seed=0)
    trainer = pl.Trainer(
        max_steps=4,
        limit_val_batches=1,
        val_check_interval=4,
        num_sanity_val_steps=0,
        strategy=DPSGDStrategy(target_epsilon=8.0, target_delta=1e-3, max_grad_norm=1.0, device="cpu"),
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    return trainer, model


def test_report_generates_before_and_after_and_computes_the_gap_from_the_final_val_perplexity() -> None:
    report = FineTuneReport(max_new_tokens=12, reference_base_perplexity=400.0, reference_perplexity=20.0)
    downstream = DownstreamAccuracy(num_notes=4, batch_size=32, score_before_fit=True)
    trainer, model = _fit([report, downstream])
    # greedy decoding: the "after" note is exactly what the final weights generate
    assert report.note_after == report.generate(trainer, model)
    # and the "before" note is what the untrained model (same seed) generates
    fresh = DPLoRAModule(model_name="tiny-llama", lora_rank=4, seed=0)
    fresh.trainer = trainer  # only for the data module's tokenizer and the precision context
    assert report.note_before == report.generate(trainer, fresh)
    assert report.note_before != report.note_after  # four steps at lr 0.05 change the greedy text
    final = float(trainer.callback_metrics["val/perplexity"])
    assert report.final_perplexity == pytest.approx(final)
    expected = (math.log(400.0) - math.log(final)) / (math.log(400.0) - math.log(20.0))
    assert report.gap_closed() == pytest.approx(expected)
    lines = report.summary_lines() + downstream.summary_lines()
    assert any(line.startswith(f"gap closed: {expected:.1%}") for line in lines)
    assert any("generated after" in line and report.note_after[:5] in line for line in lines)
    assert downstream.result_before is not None and downstream.result is not None
    assert any(f"accuracy {downstream.result_before.accuracy:.3f} before ->" in line for line in lines)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reference_base_perplexity": 100.0},
        {"reference_base_perplexity": 100.0, "reference_perplexity": float("nan")},
        {"reference_base_perplexity": 10.0, "reference_perplexity": 10.0},
        {"max_new_tokens": 0},
    ],
)
def test_bad_report_settings_are_one_clear_error(kwargs: dict) -> None:
    with pytest.raises(DPLightningError):
        FineTuneReport(**kwargs)


@pytest.mark.slow
def test_fit_summary_prints_the_report_lines(tmp_path: Path) -> None:
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.callbacks+=dplightning.callbacks.FineTuneReport",
        "--trainer.callbacks.max_new_tokens=8",
        "--trainer.callbacks.reference_base_perplexity=300",
        "--trainer.callbacks.reference_perplexity=30",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "dplightning.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = out.stdout.split("== dplightning summary ==")[1]
    assert "gap closed: " in summary and "generated before: " in summary and "generated after: " in summary


def test_without_a_datamodule_tokenizer_the_error_names_the_fix() -> None:
    model = DPLoRAModule(model_name="tiny-llama", lora_rank=4, seed=0)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(DPLightningError, match="no datamodule with a `tokenizer`"):
        FineTuneReport().generate(trainer, model)
