"""`CanaryAudit`: insert random secrets, then measure exposure, extraction and a one-run empirical ε bound."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from dplightning.auditing.canaries import (
    DEFAULT_TEMPLATE,
    DIGITS,
    Canary,
    audit_canaries,
    make_canaries,
    membership_scores,
    summarise,
)
from dplightning.auditing.lower_bound import DEFAULT_CONFIDENCE, LowerBound, one_run_audit
from dplightning.errors import DPLightningError


class CanaryAudit(Callback):
    """Secret-sharer canaries inserted through the data module's ``insert_canaries`` hook.

    For every repetition count r in ``repeats``, ``num_canaries`` canaries are drawn and each is inserted (r times)
    independently with probability ½; the others are never inserted. After fit it logs, per r, the mean exposure,
    greedy-extraction token Jaccard and exact-extraction rate of the inserted canaries
    (``audit/canary/r<r>/...``) and of the never-inserted ones (``audit/canary/not_inserted/...``), and the
    one-run ε lower bound (Steinke et al. 2023) from the r = 1 canaries beside the accountant's ε.

    The lower bound uses only canaries inserted once: DP protects one example, and a secret repeated r times is
    r examples (group privacy), which may legitimately exceed ε.

    Args:
        num_canaries: canaries drawn per repetition count (each inserted with probability ½).
        repeats: repetition counts.
        secret_length: symbols per secret; the secret space has ``len(alphabet) ** secret_length`` elements.
        alphabet: symbols of the secrets.
        template: prompt with a ``{tag}`` field (a random tag per canary).
        reference_samples: random secrets each canary is ranked against (exposure resolution ≈ log2 of this).
        extraction: also run greedy extraction.
        confidence: confidence level of the ε lower bound.
        seed: seed of the canaries and of the inclusion coin flips.
    """

    def __init__(
        self,
        num_canaries: int = 32,
        repeats: list[int] | None = None,
        secret_length: int = 8,
        alphabet: str = DIGITS,
        template: str = DEFAULT_TEMPLATE,
        reference_samples: int = 1000,
        extraction: bool = True,
        confidence: float = DEFAULT_CONFIDENCE,
        seed: int = 0,
    ) -> None:
        self.repeats_list = list(repeats) if repeats is not None else [1]
        if num_canaries < 1 or not self.repeats_list or any(r < 1 for r in self.repeats_list):
            raise DPLightningError("num_canaries must be >= 1 and repeats a non-empty list of counts >= 1")
        self.num_canaries = num_canaries
        self.secret_length = secret_length
        self.alphabet = alphabet
        self.template = template
        self.reference_samples = reference_samples
        self.extraction = extraction
        self.confidence = confidence
        self.seed = seed
        total = num_canaries * len(self.repeats_list)
        self.canaries: list[Canary] = make_canaries(total, seed, alphabet, secret_length, template)
        self.repeats: list[int] = [r for r in self.repeats_list for _ in range(num_canaries)]
        self.included: list[bool] = (np.random.default_rng(seed + 1).random(total) < 0.5).tolist()
        self.inserted = False
        self.metrics: dict[str, float] = {}
        self.lower_bound: LowerBound | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.inserted:
            return
        datamodule = getattr(trainer, "datamodule", None)  # set by fit when one is given
        if datamodule is None or not hasattr(datamodule, "insert_canaries"):
            raise DPLightningError(
                "CanaryAudit needs a data module with insert_canaries(); use TextDataModule"
            )
        chosen = [(c.text, r) for c, r, inc in zip(self.canaries, self.repeats, self.included) if inc]
        if chosen:
            datamodule.insert_canaries([t for t, _ in chosen], [r for _, r in chosen])
        self.inserted = True

    def run(
        self, pl_module: Any, tokenizer: Any, delta: float, accountant_epsilon: float | None
    ) -> dict[str, float]:
        """Exposure / extraction summary and the lower bound; also usable outside a Trainer (``dplightning audit``)."""
        results = audit_canaries(
            pl_module,
            tokenizer,
            self.canaries,
            self.included,
            self.repeats,
            self.alphabet,
            self.reference_samples,
            self.seed,
            self.extraction,
        )
        metrics = summarise(results)
        once = [i for i, r in enumerate(self.repeats) if r == 1]
        if once:
            scores = membership_scores(pl_module, tokenizer, [self.canaries[i] for i in once])
            self.lower_bound = one_run_audit(scores, [self.included[i] for i in once], delta, self.confidence)
            metrics["audit/epsilon_lower_bound"] = self.lower_bound.epsilon
            metrics["audit/epsilon_lower_bound_confidence"] = self.confidence
            if accountant_epsilon is not None:
                metrics["audit/accountant_epsilon"] = accountant_epsilon
                if self.lower_bound.epsilon > accountant_epsilon:
                    rank_zero_warn(
                        f"empirical ε lower bound {self.lower_bound.epsilon:.3f} exceeds the accountant's ε "
                        f"{accountant_epsilon:.3f}: the training is not as private as accounted (a privacy bug, or "
                        f"a {1 - self.confidence:.0%} false alarm)"
                    )
        self.metrics = metrics
        return metrics

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accountant = getattr(trainer.strategy, "accountant", None)  # None: a non-private run
        delta = getattr(trainer.strategy, "target_delta", 1e-5)
        eps = accountant.epsilon(delta) if accountant is not None else None
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            raise DPLightningError(
                "CanaryAudit needs the data module's tokenizer to score the canaries; use TextDataModule"
            )
        metrics = self.run(pl_module, tokenizer, delta, eps)
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        lb = metrics.get("audit/epsilon_lower_bound")
        rank_zero_info(
            "[dplightning] canaries: "
            + ", ".join(
                f"{k.split('/')[2]} exposure {v:.2f}" for k, v in metrics.items() if k.endswith("/exposure")
            )
            + (f"; ε lower bound {lb:.3f} ({self.confidence:.0%} conf.)" if lb is not None else "")
            + (f" vs accountant ε {eps:.3f}" if eps is not None else "")
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "canaries": [(c.prefix, c.secret) for c in self.canaries],
            "repeats": self.repeats,
            "included": self.included,
            "inserted": self.inserted,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.canaries = [Canary(p, s) for p, s in state_dict["canaries"]]
        self.repeats = list(state_dict["repeats"])
        self.included = list(state_dict["included"])
        # On resume the data module is rebuilt, so the canaries must be inserted again: keep inserted=False.
