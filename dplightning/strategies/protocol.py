"""What callbacks may rely on in a private strategy: the contract between the strategies and the callbacks
that log, guard or steer them (``PrivacyBudget``, ``NoiseSchedule``, ``QuantileClipping``, ``RLDPController``,
``AutomaticClipping``).

The protocols are structural and ``runtime_checkable``: ``isinstance(strategy, PrivateStrategy)`` checks that
every member is present (not their types). Callbacks that must only drive DP-SGD still refuse other strategies
by class (see ``dplightning.callbacks._requirements``): the presence of attributes says nothing about what the
strategy releases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from torch import Tensor

from dplightning.privacy.accounting import Accountant, AccountantKind


@runtime_checkable
class PrivateStrategy(Protocol):
    """A strategy that releases noised, clipped statistics under a budget (DP-SGD, DDP DP-SGD, DP-ZO).

    Budget and accounting:
        ``accountant`` (every step charged so far), ``accountant_kind``, ``target_epsilon``, ``target_delta``,
        ``max_epsilon`` (the hard guard; callbacks may lower it), ``epsilon(delta)``, ``within_budget(σ, q)``.
    Sampling (set when the training dataloader is processed; ``None`` before):
        ``sample_rate`` q, ``expected_batch_size`` qN, ``planned_steps``.
    Noise and clipping:
        ``noise`` (mechanism name), ``noise_multiplier`` (σ as set; ``None`` until calibrated),
        ``effective_noise_multiplier`` (what one step is charged), ``group_names``, ``clip_thresholds``,
        ``total_clip_norm``, ``auxiliary_noise_multipliers`` (other Gaussian releases made from each step's
        batch, charged in the step's σ_eff), ``set_noise_multiplier``, ``set_noise_multipliers``,
        ``set_clip_thresholds``.
    Randomness:
        ``secure_rng`` (a callback's own releases must follow it) and ``seed``.
    """

    accountant: Accountant
    accountant_kind: AccountantKind
    target_epsilon: float | None
    target_delta: float
    max_epsilon: float | None
    sample_rate: float | None
    expected_batch_size: float | None
    planned_steps: int | None
    noise: str
    noise_multiplier: float | None
    clip_thresholds: dict[str, float]
    auxiliary_noise_multipliers: dict[str, float]
    secure_rng: bool
    seed: int

    @property
    def group_names(self) -> list[str]: ...

    @property
    def effective_noise_multiplier(self) -> float: ...

    @property
    def total_clip_norm(self) -> float: ...

    def epsilon(self, delta: float | None = None) -> float: ...

    def within_budget(self, sigma: float, q: float) -> bool: ...

    def set_noise_multiplier(self, sigma: float) -> None: ...

    def set_noise_multipliers(self, multipliers: Mapping[str, float]) -> None: ...

    def set_clip_thresholds(self, thresholds: float | Mapping[str, float]) -> None: ...


@runtime_checkable
class PerExampleClippingStrategy(PrivateStrategy, Protocol):
    """A private strategy that clips per-example gradients (DP-SGD), what the clipping controllers steer.

    ``private_step_norms``: per group, the last step's per-example pre-clip norms ``[B]``. PRIVATE: only a
    mechanism that noises them (and is charged for it) may read them; it empties the dict after use.
    ``last_noisy_grad_norms``: per group, the norm of the last released (noisy) gradient; public.
    ``normalization_stability``: γ > 0 replaces clipping by per-example normalisation ``C_g/(‖g‖ + γ)``.
    """

    private_step_norms: dict[str, Tensor]
    last_noisy_grad_norms: dict[str, float]
    normalization_stability: float | None


__all__ = ["Accountant", "PerExampleClippingStrategy", "PrivateStrategy"]
