"""`DPLoRAModule`: a Hugging Face causal LM with peft LoRA adapters that exposes per-example losses.

Every privacy plugin (DP-SGD, DP-ZO, RLDP) works from :meth:`DPLoRAModule.per_example_loss`, so the module
itself knows nothing about privacy. Only LoRA parameters are trainable; checkpoints hold only them. The training
loss of the private batches is logged only with ``log_private_loss=True``: it is not covered by ε.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from torchmetrics import MeanMetric

from dplightning.errors import DPLightningError
from dplightning.losses import shifted_token_nll
from dplightning.models import default_lora_targets, load_causal_lm

Batch = dict[str, Tensor]


def _check_targets(model: nn.Module, targets: list[str], model_name: str) -> None:
    """Fail with one clear line when a requested LoRA target matches no module of the model."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        candidates = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear) or "Conv1D" in type(m).__name__
            }
        )
        raise DPLightningError(
            f"model '{model_name}' has no module named {missing} to put LoRA adapters on; "
            f"set model.lora_target_modules to some of {candidates}"
        )


def _check_optimizer(optimizer: str, learning_rate: float, momentum: float, lr_schedule: str) -> None:
    if optimizer not in ("adamw", "sgd"):
        raise DPLightningError(f"model.optimizer = {optimizer!r} is not supported; pass 'adamw' or 'sgd'")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise DPLightningError(f"model.learning_rate = {learning_rate} must be a positive finite number")
    if not 0.0 <= momentum < 1.0:
        raise DPLightningError(f"model.momentum = {momentum} is outside [0, 1); pass e.g. 0.9")
    if momentum and optimizer != "sgd":
        raise DPLightningError(
            f"model.momentum = {momentum} applies to SGD only; set model.optimizer: sgd, or momentum: 0 for AdamW"
        )
    if lr_schedule not in ("constant", "linear"):
        raise DPLightningError(
            f"model.lr_schedule = {lr_schedule!r} is not supported; pass 'constant' or 'linear'"
        )


class DPLoRAModule(pl.LightningModule):
    """Causal LM + LoRA whose ``training_step`` is the batch mean of :meth:`per_example_loss`.

    Args:
        model_name: ``"smollm2-135m"`` (bundled real model), ``"tiny-llama"`` / ``"tiny-gpt2"`` (random, for
            tests) or a local Hugging Face model directory.
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA input; 0 keeps per-example gradients deterministic.
        lora_target_modules: module names to adapt; ``None`` picks the architecture default
            (Llama ``q_proj, v_proj``; GPT-2 ``c_attn``).
        learning_rate: optimizer learning rate.
        optimizer: ``"adamw"`` or ``"sgd"``.
        momentum: SGD momentum (heavy ball, dampening 0); with every example clipped, SGD's update scales with
            ``learning_rate × max_grad_norm``, which makes the clip norm a step size. Only with ``"sgd"``.
        lr_schedule: ``"constant"``, or ``"linear"``: decay to 0 over the trainer's optimizer steps
            (``max_steps``, or the epochs' worth of steps).
        weight_decay: AdamW weight decay.
        seed: seed for the random initialisation of tiny models and LoRA ``A`` matrices.
        log_private_loss: log ``train/loss``, the mean loss of each private training batch. It is computed
            from private examples and is NOT covered by the (ε, δ) guarantee, so it is off by default; when on,
            examples with a non-finite loss are left out of the logged mean.
    """

    def __init__(
        self,
        model_name: str = "smollm2-135m",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        learning_rate: float = 2e-3,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        momentum: float = 0.0,
        lr_schedule: Literal["constant", "linear"] = "constant",
        weight_decay: float = 0.0,
        seed: int = 0,
        log_private_loss: bool = False,
    ) -> None:
        super().__init__()
        _check_optimizer(optimizer, learning_rate, momentum, lr_schedule)
        self.save_hyperparameters()
        base = load_causal_lm(model_name, seed=seed)
        targets = list(lora_target_modules) if lora_target_modules else default_lora_targets(base)
        _check_targets(base, targets, model_name)
        for p in base.parameters():
            p.requires_grad_(False)
        torch.manual_seed(seed)  # LoRA A init is random: make it reproducible
        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,  # type: ignore[arg-type]  # peft annotates int, uses alpha / r: a float works
            lora_dropout=lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
            fan_in_fan_out=base.config.model_type == "gpt2",
        )
        self.model = get_peft_model(base, config)
        # Checkpoints hold only the trainable (LoRA) weights; the frozen base is reloaded from model_name.
        self.strict_loading = False
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()

    # ----------------------------------------------------------------------------------------- losses
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, V]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    @staticmethod
    def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Next-token NLL summed per example ``[B]`` and the count of scored tokens ``[B]``.

        ``labels`` ``[B, T]`` use ``-100`` for positions that are not scored (padding). Computed a few examples
        at a time in fp32 (``losses.shifted_token_nll``): bit for bit the plain cross-entropy, less memory.
        """
        return shifted_token_nll(logits, labels)

    def per_example_loss(self, batch: Batch) -> Tensor:
        """Token-mean next-token loss of each example, padding masked. Shape ``[B]``."""
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        nll_sum, count = self.token_nll(logits, batch["labels"])
        return nll_sum / count.clamp(min=1)

    @property
    def log_private_loss(self) -> bool:
        """Whether the raw private-batch loss is logged (read by the strategies that log it themselves)."""
        return bool(self.hparams.get("log_private_loss", False))

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        losses = self.per_example_loss(batch)
        if self.log_private_loss:
            # Opt-in only: this value is a raw function of the private batch, outside the (ε, δ) guarantee.
            self.log(
                "train/loss", self.finite_mean(losses.detach()), prog_bar=True, batch_size=losses.numel()
            )
        return losses.mean()

    @staticmethod
    def finite_mean(losses: Tensor) -> Tensor:
        """Mean of the finite entries of ``losses`` (0 when none is finite).

        One inf/NaN example would otherwise make the logged value inf/NaN and single out that record. No count
        or flag goes with it, so the log does not say whether an example was left out.
        """
        finite = torch.isfinite(losses)
        return torch.where(finite, losses, 0.0).sum() / finite.sum().clamp(min=1)

    def _eval_step(self, batch: Batch, metric: MeanMetric, prefix: str) -> None:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        nll_sum, count = self.token_nll(logits, batch["labels"])
        tokens = count.sum()
        if tokens > 0:
            metric.update(nll_sum.sum() / tokens, weight=tokens)
        self.log(f"{prefix}/loss", metric, prog_bar=prefix == "val", batch_size=batch["input_ids"].size(0))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_nll, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_nll, "test")

    def on_validation_epoch_start(self) -> None:
        # Fresh metric state in the current grad mode: a `validate` run under inference mode before `fit` would
        # otherwise leave inference tensors that `fit`'s no-grad validation cannot update in place.
        self.val_nll.reset()

    def on_test_epoch_start(self) -> None:
        self.test_nll.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity(self.val_nll, "val")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity(self.test_nll, "test")

    def _log_perplexity(self, metric: MeanMetric, prefix: str) -> None:
        # Token-weighted mean NLL over the whole split, exponentiated (computed before the metric resets).
        if metric.update_count:
            self.log(f"{prefix}/perplexity", torch.exp(metric.compute()), prog_bar=prefix == "val")

    # ------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        hp = self.hparams
        optimizer: torch.optim.Optimizer
        if hp["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp["learning_rate"], momentum=hp["momentum"])
        else:
            optimizer = torch.optim.AdamW(params, lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
        if hp["lr_schedule"] == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        # step k (0-based) uses lr·(1 − k/total): the last of `total` steps still moves, the rate never goes below 0
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: max(0.0, 1.0 - k / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------------------------ checkpoints
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The LoRA weights only (what training changes)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()

    def save_adapter(self, directory: str | os.PathLike[str]) -> Path:
        """Write the LoRA adapter in peft format, atomically (temp dir, then rename).

        Load it with ``PeftModel.from_pretrained(base_model, directory)`` in plain transformers + peft.
        """
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            self.model.save_pretrained(str(tmp))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target
