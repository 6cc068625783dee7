"""`DownstreamAccuracy`: field-extraction accuracy on held-out notes at the end of fit (and during it)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from dplightning.errors import DPLightningError
from dplightning.evaluation.field_extraction import (
    HELDOUT_SPLITS,
    ExtractionResult,
    evaluate_field_extraction,
)


class DownstreamAccuracy(Callback):
    """Logs ``downstream/accuracy`` and ``downstream/majority_rate`` (and per field
    ``downstream/<field>/accuracy``) of the prompt-based field-extraction task at the end of fit, and every
    ``every_n_val_epochs`` validation runs if set. The last result is :attr:`result`.

    Each held-out note is followed by one question per field ("Question: Was the patient readmitted?
    Answer:"); the prediction is the field's allowed answer with the highest log-probability under the model,
    scored by exact match against the note's record (:mod:`dplightning.evaluation.field_extraction`). The
    majority rate is the accuracy of always giving each field's most common value: the bar to clear. Train
    with ``data.qa_fraction > 0`` so that every method sees the question/answer format.

    Not covered by ε: the notes scored are validation/test data (or fresh synthetic notes), held out from
    training; if they are private, the logged accuracy is a release about them that the (ε, δ) guarantee does
    not protect (the same as validation and test perplexity).

    Needs a module with ``forward(input_ids, attention_mask) -> logits`` (``DPLoRAModule``) and a
    ``TextDataModule`` on ``pseudo_clinical`` or ``diabetic_data.csv`` (notes with records).

    Args:
        fields: record fields to ask about (``None``: all of ``dplightning.evaluation.FIELDS``).
        split: held-out split whose notes are scored, ``"test"`` or ``"val"``.
        num_notes: notes scored (``None``: the whole split); beyond the split's size, ``pseudo_clinical``
            tops up with fresh notes from the generator. 500 or more gives a standard error under ~2 %.
        every_n_val_epochs: also score after every n-th validation run (sanity check excluded).
        score_before_fit: also score at the start of fit (the base model's zero-shot accuracy when fit starts
            from it), kept as :attr:`result_before` and shown in the run's summary.
        batch_size: scoring batch size (prompt × answer rows per forward).
        max_length: tokens per scored text, cut on the left (``None``: the tokenizer's limit).
    """

    def __init__(
        self,
        fields: list[str] | None = None,
        split: str = "test",
        num_notes: int | None = None,
        every_n_val_epochs: int | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        score_before_fit: bool = False,
    ) -> None:
        if split not in HELDOUT_SPLITS:
            raise DPLightningError(
                f"DownstreamAccuracy split '{split}' is not held out; pass one of {list(HELDOUT_SPLITS)}"
            )
        if every_n_val_epochs is not None and every_n_val_epochs < 1:
            raise DPLightningError(f"every_n_val_epochs must be >= 1 or None, got {every_n_val_epochs}")
        if (num_notes is not None and num_notes < 1) or batch_size < 1:
            raise DPLightningError(
                "num_notes must be >= 1 (or None) and batch_size >= 1; pass positive counts"
            )
        self.fields = list(fields) if fields is not None else None
        self.split = split
        self.num_notes = num_notes
        self.every_n_val_epochs = every_n_val_epochs
        self.batch_size = batch_size
        self.max_length = max_length
        self.score_before_fit = score_before_fit
        self.result: ExtractionResult | None = None
        self.result_before: ExtractionResult | None = None
        self.result_step: int | None = None
        self._val_runs = 0

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ExtractionResult:
        """Score now, log the metrics at the current step and keep the result."""
        datamodule = getattr(trainer, "datamodule", None)  # set by fit/validate/test when one is given
        if datamodule is None or not hasattr(datamodule, "split_records"):
            raise DPLightningError("DownstreamAccuracy needs a data module with records; use TextDataModule")
        # the precision validation runs under (bf16 autocast under bf16-mixed): scoring costs forwards only
        with trainer.precision_plugin.forward_context():
            self.result = evaluate_field_extraction(
                pl_module,
                datamodule,
                self.fields,
                self.split,
                self.num_notes,
                self.batch_size,
                self.max_length,
            )
        self.result_step = trainer.global_step
        if trainer.logger is not None:
            trainer.logger.log_metrics(self.result.metrics(), step=trainer.global_step)
        return self.result

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.score_before_fit:
            self.result_before = self.run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_val_epochs:
            return
        self._val_runs += 1
        if self._val_runs % self.every_n_val_epochs == 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result_step != trainer.global_step:  # the weights changed since the last score
            self.run(trainer, pl_module)
        assert self.result is not None
        r = self.result
        rank_zero_info(
            f"[dplightning] downstream field extraction on {r.n} held-out notes: accuracy {r.accuracy:.3f} "
            f"(majority class {r.majority_rate:.3f})"
        )

    def summary_lines(self) -> list[str]:
        if self.result is None:
            return []
        r, before = self.result, self.result_before
        start = f"{before.accuracy:.3f} before -> " if before is not None else ""
        return [
            f"downstream field extraction ({r.n} held-out notes): accuracy {start}{r.accuracy:.3f} after "
            f"(majority class {r.majority_rate:.3f})"
        ]
