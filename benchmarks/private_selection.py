"""A private choice of one of k DP-SGD runs on private validation data, and what the whole procedure spends.

Honest hyper-parameter tuning (``rldp_decide.py``'s M4) runs k trials on the same private training notes and keeps
the one that does best on the private validation notes. Both steps are charged:

* **the trials**: k·T Poisson-subsampled Gaussian releases on the same training notes, composed with the PLD
  accountant (the one the strategy itself uses), at the run's δ. Composing them jointly is much tighter than
  adding k per-trial ε, and the room left below the target pays for the selection.
* **the selection**: the exponential mechanism (McSherry & Talwar 2007; Dwork & Roth, Theorem 3.10) with utility
  −(mean over the validation split of min(per-example loss, ``bound``)). Adding or removing one validation note
  moves that mean by at most ``bound / n`` (n the split's size), so choosing with probability
  ∝ exp(−ε_sel·score / (2·bound/n)) is ε_sel-DP, with δ = 0. A training note does not enter the scores except
  through the released trials, so for it the choice is post-processing.

Sequential composition (Dwork & Roth, Theorem 3.16) gives (ε_trials + ε_sel, δ) for the released model; the
selection gets ε_sel = target − ε_trials, so the total is the target. That total covers the chosen model alone: the
other trials' models and their scores stay private. The choice is drawn from a seeded generator (reproducible, like
a seeded strategy), so the guarantee assumes that seed is secret; ``rldp_decide.py`` states its seeds and
publishes the trials' validation figures to explain its choices, which a real use of the procedure would not.

``ClippedValidationLoss`` is the callback each candidate cell carries: after fit it scores the whole validation
split and hands the score to the benchmark harness (``run_matrix.py`` reads ``metrics``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

# Per-example loss bound, in nats per token: above the base model's mean loss on these notes (≈ 4.8, test
# perplexity ≈ 120), so a run that learned anything is scored unclipped; a smaller bound would choose better
# (sensitivity bound / n) but clip the runs being compared.
BOUND = 8.0


class ClippedValidationLoss(pl.Callback):
    """After fit: the mean over the validation split of min(per-example token-mean loss, ``bound``).

    Non-finite losses count as ``bound``. ``metrics`` holds ``selection/clipped_val_loss`` and
    ``selection/examples`` (n, for the sensitivity ``bound / n``). ``max_batches`` (default: the whole split)
    only shortens tests: the sensitivity assumes n does not depend on the data, which a fixed split size gives.
    """

    def __init__(self, bound: float = BOUND, max_batches: int | None = None) -> None:
        super().__init__()
        if not bound > 0:
            raise ValueError(f"bound must be > 0 nats, got {bound}")
        self.bound = float(bound)
        self.max_batches = max_batches
        self.metrics: dict[str, float] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        losses = self._validation_losses(trainer, pl_module)
        scores = clip_losses(losses, self.bound)
        self.metrics = {
            "selection/clipped_val_loss": float(scores.mean()),
            "selection/examples": float(scores.numel()),
        }
        if trainer.logger is not None:
            trainer.logger.log_metrics(self.metrics, step=trainer.global_step)

    def _validation_losses(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        loader = trainer.datamodule.val_dataloader()  # type: ignore[attr-defined]
        per_example_loss: Any = pl_module.per_example_loss
        losses = []
        was_training = pl_module.training
        pl_module.eval()
        try:
            # the precision validation runs under: scoring costs forwards only
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for i, batch in enumerate(loader):
                    if self.max_batches is not None and i >= self.max_batches:
                        break
                    losses.append(per_example_loss(trainer.strategy.batch_to_device(batch)).float().cpu())
        finally:
            pl_module.train(was_training)
        return torch.cat(losses)


def clip_losses(losses: torch.Tensor, bound: float) -> torch.Tensor:
    """Each loss into [0, bound]; NaN and +inf (a diverged run) count as ``bound``."""
    return torch.nan_to_num(losses, nan=bound, posinf=bound, neginf=0.0).clamp(0.0, bound)


def exponential_choice(
    scores: Sequence[float], epsilon: float, sensitivity: float, rng: np.random.Generator
) -> int:
    """Index drawn with probability ∝ exp(−ε·score / (2·sensitivity)) (lower score = better): ε-DP.

    Gumbel-max form: the argmax of the logits plus i.i.d. standard Gumbel noise has exactly that law. ε = 0 is a
    uniform choice.
    """
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"selection epsilon must be finite and >= 0, got {epsilon}")
    if not sensitivity > 0:
        raise ValueError(f"sensitivity must be > 0, got {sensitivity}")
    logits = -epsilon * np.asarray(scores, dtype=float) / (2.0 * sensitivity)
    return int(np.argmax(logits + rng.gumbel(size=len(logits))))


@dataclass(frozen=True)
class Trial:
    """One candidate run, as its benchmark row records it."""

    sigma: float  # the noise multiplier of every step
    sample_rate: float
    steps: int
    epsilon_spent: float  # what the run's own accountant reported
    score: float  # clipped mean validation loss
    examples: int  # validation notes scored


@dataclass(frozen=True)
class SelectionAccount:
    """What choosing among the trials spends, at ``delta``."""

    trials_epsilon: float  # the k trials composed (PLD)
    selection_epsilon: float  # the exponential mechanism's
    delta: float

    @property
    def total(self) -> float:
        return self.trials_epsilon + self.selection_epsilon


@functools.lru_cache(maxsize=64)
def composed_epsilon(runs: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """ε at ``delta`` of all ``(σ, q, steps)`` runs on the same data, composed by the PLD accountant."""
    from dplightning.privacy.accounting import StepEvent, make_accountant

    return make_accountant("pld").epsilon_with(delta, [(StepEvent(s, q), n) for s, q, n in runs])


def check_trial_accounting(trial: Trial, delta: float) -> None:
    """Recompute one trial's ε from (σ, q, steps): if it differs from what the run reported, the composition
    below would not describe the runs that happened (e.g. a wrong q), so refuse."""
    alone = composed_epsilon(((trial.sigma, trial.sample_rate, trial.steps),), delta)
    if not math.isclose(alone, trial.epsilon_spent, rel_tol=1e-6, abs_tol=1e-9):
        raise ValueError(
            f"a trial's ε recomputed from σ={trial.sigma:.6g}, q={trial.sample_rate:.6g}, {trial.steps} steps is "
            f"{alone:.6g}, but the run reported {trial.epsilon_spent:.6g}"
        )


def account(trials: Sequence[Trial], target_epsilon: float, delta: float) -> SelectionAccount:
    """Compose the trials and give the selection what is left of ``target_epsilon`` (never below 0)."""
    for trial in trials:
        check_trial_accounting(trial, delta)
    spent = composed_epsilon(tuple((t.sigma, t.sample_rate, t.steps) for t in trials), delta)
    return SelectionAccount(spent, max(0.0, target_epsilon - spent), delta)


def choose(
    trials: Sequence[Trial], target_epsilon: float, delta: float, bound: float, seed: Sequence[int]
) -> tuple[int, SelectionAccount]:
    """The private choice among ``trials`` and its account; ``seed`` fixes the draw (stable across reports)."""
    spent = account(trials, target_epsilon, delta)
    sensitivity = bound / min(t.examples for t in trials)
    rng = np.random.default_rng(list(seed))
    index = exponential_choice([t.score for t in trials], spent.selection_epsilon, sensitivity, rng)
    return index, spent
