"""Membership inference: loss-threshold and reference-calibrated attacks, ROC AUC and TPR at low FPR.

Scores follow one convention: **higher score = "member"**. The ROC curve is computed exactly from the scores
(every distinct score is a threshold); AUC is the Mann-Whitney statistic with ties counted ½, so identical
score distributions give 0.5 and perfectly separated ones 1.0. TPR at FPR ≤ x is the best TPR over thresholds
whose empirical FPR is ≤ x; with fewer than 1/x non-members that is the TPR at FPR = 0 (conservative).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dplightning.errors import DPLightningError

FPR_LEVELS = (0.01, 0.001)


def _as_scores(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(
        values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64
    ).reshape(-1)
    if arr.size == 0:
        raise DPLightningError(f"{name} is empty; an attack needs at least one member and one non-member")
    if not np.all(np.isfinite(arr)):
        raise DPLightningError(f"{name} has non-finite scores; check the losses (NaN from an empty example?)")
    return arr


def roc_curve(member_scores: Any, nonmember_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) ``[K+1]`` from (0, 0) to (1, 1), one point per distinct score threshold (predict member when
    score ≥ threshold)."""
    pos = _as_scores(member_scores, "member scores")
    neg = _as_scores(nonmember_scores, "non-member scores")
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones_like(pos), np.zeros_like(neg)])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_run = np.r_[np.diff(scores) != 0, True]  # a threshold admits every tied score at once
    tp = np.cumsum(labels)[last_of_run]
    fp = np.cumsum(1 - labels)[last_of_run]
    return np.r_[0.0, fp / neg.size], np.r_[0.0, tp / pos.size]


def roc_auc(member_scores: Any, nonmember_scores: Any) -> float:
    """P(score of a random member > score of a random non-member) + ½ P(tie)."""
    pos = _as_scores(member_scores, "member scores")
    neg = _as_scores(nonmember_scores, "non-member scores")
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left")
    ties = np.searchsorted(neg_sorted, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (pos.size * neg.size))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """Best TPR among thresholds with empirical FPR ≤ ``max_fpr``."""
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


@dataclass
class AttackResult:
    """One attack's outcome: AUC, TPR at 1 % and 0.1 % FPR, and the ROC curve."""

    name: str
    auc: float
    tpr_at_fpr: dict[float, float]
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)
    num_members: int = 0
    num_nonmembers: int = 0

    @property
    def auc_se(self) -> float:
        """Standard error of the AUC (Hanley & McNeil 1982), from the AUC and the two sample sizes: how far an
        AUC of 0.5 + x can be from chance by sampling alone."""
        a, n1, n0 = self.auc, self.num_members, self.num_nonmembers
        if n1 < 1 or n0 < 1:
            return float("nan")
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0)
        return float(np.sqrt(max(var, 0.0)))

    def metrics(self, prefix: str = "audit/mia") -> dict[str, float]:
        """Flat ``{name: value}`` for a logger, e.g. ``audit/mia/loss/auc``, ``audit/mia/loss/tpr@0.01fpr``."""
        out = {f"{prefix}/{self.name}/auc": self.auc, f"{prefix}/{self.name}/auc_se": self.auc_se}
        out[f"{prefix}/{self.name}/members"] = float(self.num_members)
        out.update({f"{prefix}/{self.name}/tpr@{level:g}fpr": v for level, v in self.tpr_at_fpr.items()})
        return out


def evaluate_attack(name: str, member_scores: Any, nonmember_scores: Any) -> AttackResult:
    """ROC, AUC and TPR at the :data:`FPR_LEVELS` of a scoring attack (higher = member)."""
    fpr, tpr = roc_curve(member_scores, nonmember_scores)
    return AttackResult(
        name=name,
        auc=roc_auc(member_scores, nonmember_scores),
        tpr_at_fpr={level: tpr_at_fpr(fpr, tpr, level) for level in FPR_LEVELS},
        fpr=fpr,
        tpr=tpr,
        num_members=len(np.asarray(member_scores).reshape(-1)),
        num_nonmembers=len(np.asarray(nonmember_scores).reshape(-1)),
    )


def loss_attack(member_losses: Any, nonmember_losses: Any) -> AttackResult:
    """Loss-threshold attack (Yeom et al. 2018): low loss ⇒ member."""
    return evaluate_attack(
        "loss",
        -_as_scores(member_losses, "member losses"),
        -_as_scores(nonmember_losses, "non-member losses"),
    )


def reference_attack(
    member_losses: Any, member_reference: Any, nonmember_losses: Any, nonmember_reference: Any
) -> AttackResult:
    """Reference-calibrated attack (Carlini et al. 2021, Watson et al. 2022): score = reference loss − loss, where
    the reference is the base model before fine-tuning; removes per-example difficulty from the loss signal."""
    return evaluate_attack(
        "reference",
        _as_scores(member_reference, "member reference losses") - _as_scores(member_losses, "member losses"),
        _as_scores(nonmember_reference, "non-member reference losses")
        - _as_scores(nonmember_losses, "non-member losses"),
    )


def min_k_percent_scores(token_logprobs: Tensor, mask: Tensor, k_fraction: float) -> Tensor:
    """Min-k % probability (Shi et al. 2024): mean of the lowest ``k_fraction`` of each example's token
    log-probabilities. ``token_logprobs``, ``mask`` ``[B, T]`` → ``[B]`` (higher = more likely a member)."""
    if not 0.0 < k_fraction <= 1.0:
        raise DPLightningError(f"min-k fraction must be in (0, 1], got {k_fraction}; e.g. 0.2")
    filled = token_logprobs.masked_fill(~mask.bool(), float("inf"))
    counts = mask.sum(1).clamp(min=1)
    k = (counts.float() * k_fraction).ceil().long().clamp(min=1)
    lowest = filled.sort(dim=1).values
    keep = torch.arange(lowest.shape[1], device=lowest.device)[None, :] < k[:, None]
    return torch.where(keep, lowest, torch.zeros_like(lowest)).sum(1) / k


@torch.no_grad()
def example_statistics(
    module: Any, batches: Iterable[dict[str, Tensor]], k_fraction: float = 0.2
) -> dict[str, Tensor]:
    """Per-example ``loss`` (token-mean NLL) and ``min_k`` scores ``[N]`` of a causal LM module (one exposing
    ``forward(input_ids, attention_mask) -> logits``) over padded causal-LM batches."""
    was_training = module.training
    module.eval()
    losses, mink = [], []
    device = next(module.parameters()).device
    for batch in batches:
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        logits = module(ids, batch.get("attention_mask", torch.ones_like(ids)).to(device))[:, :-1].float()
        target = labels[:, 1:]
        mask = target != -100
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        logp = logp * mask
        losses.append(-(logp.sum(1) / mask.sum(1).clamp(min=1)).cpu())
        mink.append(min_k_percent_scores(logp, mask, k_fraction).cpu())
    module.train(was_training)
    return {"loss": torch.cat(losses), "min_k": torch.cat(mink)}


def membership_audit(
    module: Any,
    member_batches: Iterable[dict[str, Tensor]],
    nonmember_batches: Iterable[dict[str, Tensor]],
    k_fraction: float = 0.2,
    use_reference: bool = True,
) -> dict[str, AttackResult]:
    """Runs the loss, min-k % and (if the module has LoRA adapters that can be disabled) reference attacks.

    The reference model is the same network with its adapters switched off: the base model before fine-tuning
    (LoRA's B starts at zero, so this *is* the initial model).
    """
    members, nonmembers = list(member_batches), list(nonmember_batches)
    mem = example_statistics(module, members, k_fraction)
    non = example_statistics(module, nonmembers, k_fraction)
    results = {
        "loss": loss_attack(mem["loss"], non["loss"]),
        "min_k": evaluate_attack("min_k", mem["min_k"], non["min_k"]),
    }
    peft_model = getattr(module, "model", None)
    if use_reference and peft_model is not None and hasattr(peft_model, "disable_adapter"):
        with peft_model.disable_adapter():
            mem_ref = example_statistics(module, members, k_fraction)["loss"]
            non_ref = example_statistics(module, nonmembers, k_fraction)["loss"]
        results["reference"] = reference_attack(mem["loss"], mem_ref, non["loss"], non_ref)
    return results


def save_roc_png(results: dict[str, AttackResult], path: str) -> str | None:
    """Log-log ROC curves of all attacks as a PNG; ``None`` (nothing written) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for r in results.values():
        ax.plot(np.maximum(r.fpr, 1e-4), np.maximum(r.tpr, 1e-4), label=f"{r.name} (AUC {r.auc:.3f})")
    ax.plot([1e-4, 1], [1e-4, 1], "k:", lw=0.8, label="chance")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="membership inference ROC",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
