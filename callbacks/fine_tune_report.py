"""`FineTuneReport`: what fine-tuning changed, for the run's summary: a generated note before and after, and the
share of a reference perplexity gap closed."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from dplightning.errors import DPLightningError


class FineTuneReport(Callback):
    """Generates a note from a public prompt before and after fit (greedy decoding: no randomness, so the two
    differ only because the weights did), and, given reference perplexities, the share of the base →
    reference log-perplexity gap that the final validation perplexity closes. :meth:`summary_lines` hands the
    figures to ``dplightning fit``'s summary.

    Privacy: the prompt is public and the "after" note is a function of the released weights only (post-
    processing, covered by ε). The gap closed is computed from validation perplexity, a figure about held-out
    data that the guarantee does not cover (as the validation perplexity the run already logs).

    Args:
        prompt: public text the model continues (not taken from the data).
        max_new_tokens: tokens generated after the prompt.
        reference_base_perplexity / reference_perplexity: validation perplexities of the base model and of the
            reference run (e.g. non-private LoRA) measured elsewhere on the same validation split; both or none.
        reference_source: where the references come from, printed next to them.
    """

    def __init__(
        self,
        *,
        prompt: str = "Discharge note -",
        max_new_tokens: int = 48,
        reference_base_perplexity: float | None = None,
        reference_perplexity: float | None = None,
        reference_source: str = "",
    ) -> None:
        if max_new_tokens < 1:
            raise DPLightningError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if (reference_base_perplexity is None) != (reference_perplexity is None):
            raise DPLightningError(
                "pass both reference_base_perplexity and reference_perplexity (the two ends of the gap), or neither"
            )
        refs = [r for r in (reference_base_perplexity, reference_perplexity) if r is not None]
        if any(not (math.isfinite(r) and r >= 1.0) for r in refs) or (len(refs) == 2 and refs[0] == refs[1]):
            raise DPLightningError(
                f"reference perplexities must be finite, >= 1 and different, got {refs}; pass measured values"
            )
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.reference_base_perplexity = reference_base_perplexity
        self.reference_perplexity = reference_perplexity
        self.reference_source = reference_source
        self.note_before: str | None = None
        self.note_after: str | None = None
        self.final_perplexity: float | None = None

    def generate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """Greedy continuation of the prompt by the current weights (text after the prompt)."""
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            raise DPLightningError(
                "FineTuneReport generates text with the datamodule's tokenizer, but the trainer has no datamodule "
                "with a `tokenizer`; pass one to fit (e.g. dplightning.data.TextDataModule) or leave FineTuneReport out"
            )
        model: Any = pl_module.model  # the peft-wrapped causal LM of DPLoRAModule
        ids = tokenizer(self.prompt, return_tensors="pt")["input_ids"].to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )
        finally:
            pl_module.train(was_training)
        return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()

    def gap_closed(self) -> float | None:
        """(log ppl_base − log ppl_final) / (log ppl_base − log ppl_reference); None without references."""
        if self.final_perplexity is None or self.reference_base_perplexity is None:
            return None
        assert self.reference_perplexity is not None
        base = math.log(self.reference_base_perplexity)
        return (base - math.log(self.final_perplexity)) / (base - math.log(self.reference_perplexity))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.note_before = self.generate(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ppl = trainer.callback_metrics.get("val/perplexity")
        self.final_perplexity = None if ppl is None else float(ppl)
        if trainer.is_global_zero:
            self.note_after = self.generate(trainer, pl_module)

    def summary_lines(self) -> list[str]:
        lines = []
        gap = self.gap_closed()
        if gap is not None:
            source = f" ({self.reference_source})" if self.reference_source else ""
            lines.append(
                f"gap closed: {gap:.1%} of the log-perplexity gap between the base model "
                f"({self.reference_base_perplexity:.3f}) and the reference ({self.reference_perplexity:.3f}), "
                f"stored references{source}"
            )
        if self.note_before is not None:
            lines.append(f"generated before: {self.prompt} {self.note_before!r}")
        if self.note_after is not None:
            lines.append(f"generated after:  {self.prompt} {self.note_after!r}")
        return lines
