"""`MembershipInferenceAudit`: loss-threshold, min-k % and reference-calibrated attacks after (or during) fit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import ConcatDataset, DataLoader, Subset

from dplightning.auditing.membership import AttackResult, membership_audit, save_roc_png
from dplightning.errors import DPLightningError

NONMEMBER_SPLITS = ("test", "val+test")


def _check_nonmembers(nonmembers: str) -> None:
    if nonmembers not in NONMEMBER_SPLITS:
        raise DPLightningError(f"nonmembers must be one of {NONMEMBER_SPLITS}, got {nonmembers!r}")


def audit_loaders(
    datamodule: Any, max_examples: int, batch_size: int, seed: int = 0, nonmembers: str = "test"
) -> tuple[DataLoader, DataLoader]:
    """Balanced member / non-member loaders: members from the training split (inserted canaries excluded),
    non-members from the test split, or the validation and test splits together (``nonmembers="val+test"``,
    for more non-members than the test split holds): the same distribution, never trained on. At most
    ``max_examples`` each."""
    _check_nonmembers(nonmembers)
    datamodule.setup()
    train, test = datamodule.train_dataset, datamodule.test_dataset
    if train is None or test is None or len(test) == 0:
        raise DPLightningError(
            "membership inference needs a test split of non-members; set data.test_fraction > 0"
        )
    if nonmembers == "val+test" and getattr(datamodule, "val_dataset", None) is not None:
        test = ConcatDataset([datamodule.val_dataset, test])
    n_members = len(train) - sum(
        getattr(datamodule, "canary_repeats", [])
    )  # canaries are appended at the end
    n = min(n_members, len(test), max_examples)
    gen = torch.Generator().manual_seed(seed)
    members = torch.randperm(n_members, generator=gen)[:n].tolist()
    nonmember_indices = torch.randperm(len(test), generator=gen)[:n].tolist()

    def make(dataset: Any, indices: list[int]) -> DataLoader:
        return DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=datamodule.collate_fn)

    return make(train, members), make(test, nonmember_indices)


class MembershipInferenceAudit(Callback):
    """Logs ``audit/mia/<attack>/auc`` and ``.../tpr@0.01fpr``, ``.../tpr@0.001fpr`` for the loss, min-k % and
    reference (base model before fine-tuning) attacks at the end of fit, and every ``every_n_epochs`` if set.

    Needs a module with ``forward(input_ids, attention_mask) -> logits`` (``DPLoRAModule``) and a data module
    with train/test splits (``TextDataModule``). Members and non-members are balanced.

    Args:
        max_examples: members (and non-members) evaluated at most.
        min_k_fraction: k of the min-k % attack.
        every_n_epochs: also audit at the end of every n-th training epoch (``None``: only at the end of fit).
        roc_png_dir: write ``roc_<step>.png`` there (needs matplotlib; skipped with a note if missing).
        batch_size: evaluation batch size.
        seed: which examples are sampled.
        nonmembers: ``"test"`` (default) or ``"val+test"``: where non-members come from (the validation split
            only chooses checkpoints and stops, so it is never trained on either).
    """

    def __init__(
        self,
        max_examples: int = 256,
        min_k_fraction: float = 0.2,
        every_n_epochs: int | None = None,
        roc_png_dir: str | None = None,
        batch_size: int = 32,
        seed: int = 0,
        nonmembers: str = "test",
    ) -> None:
        _check_nonmembers(nonmembers)
        if max_examples < 2 or batch_size < 1:
            raise DPLightningError("max_examples must be >= 2 and batch_size >= 1")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise DPLightningError(f"every_n_epochs must be >= 1 or None, got {every_n_epochs}")
        self.max_examples = max_examples
        self.min_k_fraction = min_k_fraction
        self.every_n_epochs = every_n_epochs
        self.roc_png_dir = roc_png_dir
        self.batch_size = batch_size
        self.seed = seed
        self.nonmembers = nonmembers
        self.results: dict[str, AttackResult] = {}
        self.metrics: dict[str, float] = {}

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        datamodule = getattr(trainer, "datamodule", None)  # set by fit/validate/test when one is given
        if datamodule is None or not hasattr(datamodule, "test_dataset"):
            raise DPLightningError(
                "MembershipInferenceAudit needs a data module with a test split; use TextDataModule"
            )
        members, nonmembers = audit_loaders(
            datamodule, self.max_examples, self.batch_size, self.seed, self.nonmembers
        )
        self.results = membership_audit(pl_module, members, nonmembers, self.min_k_fraction)
        self.metrics = {k: v for r in self.results.values() for k, v in r.metrics().items()}
        if trainer.logger is not None:
            trainer.logger.log_metrics(self.metrics, step=trainer.global_step)
        if self.roc_png_dir and trainer.is_global_zero:
            os.makedirs(self.roc_png_dir, exist_ok=True)
            path = save_roc_png(self.results, str(Path(self.roc_png_dir) / f"roc_{trainer.global_step}.png"))
            if path is None:
                rank_zero_info(
                    "[dplightning] matplotlib is not installed: ROC PNG skipped (pip install matplotlib)"
                )
        return self.metrics

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module)
        summary = ", ".join(f"{r.name} AUC {r.auc:.3f}" for r in self.results.values())
        rank_zero_info(f"[dplightning] membership inference: {summary}")
