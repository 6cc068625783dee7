"""`AutomaticClipping`: per-example gradient normalisation instead of clipping (no threshold to tune).

Bu, Wang, Zha & Karypis, "Automatic Clipping: Differentially Private Deep Learning Made Easier and Stronger"
(NeurIPS 2023; arXiv 2206.07136, 2022), and Yang et al.'s normalised DP-SGD: each example's gradient of group g
is scaled to ``C_g · g_i / (||g_i|| + γ)`` before summing. Its norm is ``C_g·||g_i||/(||g_i||+γ) < C_g``, so the
sensitivity, the noise ``N(0, (σ_g C_g)²)`` and the accounting are exactly those of clipping at ``C_g``; ``C_g``
only rescales the update (a learning-rate factor). The stability constant γ > 0 keeps small gradients small
(AUTO-S); γ → 0 is pure normalisation (AUTO-V).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from dplightning.callbacks._requirements import require_dpsgd
from lightning.pytorch.callbacks import Callback

from dplightning.errors import DPLightningError


class AutomaticClipping(Callback):
    """Switches ``DPSGDStrategy`` from clipping to per-example normalisation for the duration of ``fit``.

    Args:
        stability: γ > 0 in ``g_i/(||g_i|| + γ)``; Bu et al. use 0.01.
    """

    def __init__(self, stability: float = 0.01) -> None:
        if not stability > 0:
            raise DPLightningError(
                f"stability must be > 0, got {stability}; γ = 0 divides zero gradients by zero, use e.g. 0.01"
            )
        self.stability = float(stability)
        self._strategy: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        require_dpsgd(strategy, "AutomaticClipping")  # DP-ZO has no per-example gradients to normalise
        strategy.normalization_stability = self.stability
        self._strategy = strategy

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._strategy is not None:  # the strategy clips again if reused without this callback
            self._strategy.normalization_stability = None
            self._strategy = None
