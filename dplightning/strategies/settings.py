"""The privacy settings every private strategy takes, checked in one place."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.privacy.accounting import AccountantKind


@dataclass(frozen=True, kw_only=True)
class PrivacySettings:
    """Budget, accounting and randomness of a private strategy (the arguments DP-SGD and DP-ZO share).

    Args:
        noise_multiplier: noise scale / sensitivity of one step's release. ``None`` calibrates it from
            ``target_epsilon`` and the planned steps. ``0`` disables noise (ε = ∞).
        target_epsilon: ε budget; training never takes a step that would exceed it.
        target_delta: δ of the guarantee.
        accountant: ``"pld"`` (tight, default) or ``"rdp"``.
        poisson_sampling: Poisson-sample the training batches (what the accounting assumes).
        secure_rng: draw noise and batches from the OS CSPRNG. ``None`` (default): yes unless a ``seed`` is given.
        seed: seed of the noise generator and the Poisson sampler, for reproducible runs; the guarantee then
            assumes it stays secret (it is in the run's config and checkpoints). ``None`` (default): no seed,
            the CSPRNG.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    target_delta: float = 1e-5
    accountant: AccountantKind = "pld"
    poisson_sampling: bool = True
    secure_rng: bool | None = None
    seed: int | None = None

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any], **overrides: Any) -> PrivacySettings:
        """The settings among a strategy constructor's ``arguments`` (its ``locals()``), with ``overrides``.

        Each constructor spells the settings out in its own signature, which is what LightningCLI reads; this
        collects them by name so the constructor bodies do not repeat all seven. A missing name is a
        ``KeyError``: every private strategy takes every setting. Not checked: see :meth:`validate`.
        """
        values = {field.name: arguments[field.name] for field in fields(cls)}
        return cls(**(values | overrides))

    def randomness(self) -> tuple[bool, int]:
        """``(secure, seed)`` as the strategy uses them. A seed the user did not choose would be a public constant
        (anyone could replay the noise and the batches), so without one the noise comes from the OS CSPRNG; a
        given seed makes runs reproducible and the guarantee assumes it secret. DP-ZO's public directions have a
        seed of their own (``direction_seed``)."""
        secure = self.seed is None if self.secure_rng is None else self.secure_rng
        return secure, 0 if self.seed is None else int(self.seed)

    def validate(self, owner: str) -> PrivacySettings:
        """Raise on the first setting that cannot work, naming the fix; ``owner`` names the strategy in the
        message. Returns ``self``."""
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise DPLightningError(f"{owner} needs noise_multiplier or target_epsilon; set one of them")
        if self.noise_multiplier is not None and not 0 <= self.noise_multiplier < math.inf:
            raise DPLightningError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise PrivacyBudgetError(
                f"target_epsilon must be > 0, got {self.target_epsilon}; pick a positive budget"
            )
        if self.secure_rng is False and self.seed is None:
            raise DPLightningError(
                f"{owner}: secure_rng=False needs a seed (seeded noise without one would follow a public constant); "
                "set seed, or leave secure_rng unset for the OS CSPRNG"
            )
        if not 0.0 < self.target_delta < 1.0:
            raise DPLightningError(
                f"target_delta must be in (0, 1), got {self.target_delta}; typical is 1/N^1.1"
            )
        return self
