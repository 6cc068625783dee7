"""`AutomaticClipping`: per-example gradient normalisation instead of clipping (no threshold to tune).

Bu, Wang, Zha & Karypis, "Automatic Clipping: Differentially Private Deep Learning Made Easier and Stronger"
(NeurIPS 2023; arXiv 2206.07136, 2022), and Yang et al.'s normalised DP-SGD: each example's gradient of group g
is scaled to ``C_g · g_i / (||g_i|| + γ)`` before summing. Its norm is ``C_g·||g_i||/(||g_i||+γ) < C_g``, so the
sensitivity, the noise ``N(0, (σ_g C_g)²)`` and the accounting are exactly those of clipping at ``C_g``; ``C_g``
only rescales the update (a learning-rate factor). The stability constant γ > 0 keeps small gradients small
(AUTO-S); γ → 0 is pure normalisation (AUTO-V).
"""

from __future__ import annotations

import lightning.pytorch as pl
from typing_extensions import override

from dplightning.callbacks._controller import StrategyController
from dplightning.errors import DPLightningError
from dplightning.strategies.protocol import PerExampleClippingStrategy


class AutomaticClipping(StrategyController[PerExampleClippingStrategy]):
    """Switches ``DPSGDStrategy`` from clipping to per-example normalisation for the duration of ``fit``.

    Args:
        stability: γ > 0 in ``g_i/(||g_i|| + γ)``; Bu et al. use 0.01.
    """

    requires_dpsgd = True  # DP-ZO has no per-example gradients to normalise

    def __init__(self, stability: float = 0.01) -> None:
        super().__init__()
        if not stability > 0:
            raise DPLightningError(
                f"stability must be > 0, got {stability}; γ = 0 divides zero gradients by zero, use e.g. 0.01"
            )
        self.stability = float(stability)

    @override
    def attach(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, strategy: PerExampleClippingStrategy
    ) -> None:
        strategy.normalization_stability = self.stability

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.strategy is not None:  # the strategy clips again if reused without this callback
            self.strategy.normalization_stability = None
            self.strategy = None
