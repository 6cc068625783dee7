"""The privacy core, without Lightning: accounting, mechanisms, clipping, integer grids, noise.

The accounting entry points are re-exported here and imported on first access (PEP 562): the submodules
(``discretization``, ``noise_addition``, ...) import this package first, and must not pay for
``dp_accounting`` and scipy each time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dplightning._lazy import lazy_exports

# Public name -> submodule of this package that defines it.
_EXPORTS: dict[str, str] = {
    "AccountantKind": "accounting",
    "PLDAccountant": "accounting",
    "PrivacyAccountant": "accounting",
    "RDPAccountant": "accounting",
    "StepEvent": "accounting",
    "compute_epsilon": "accounting",
    "laplace_scale_for_pure_epsilon": "accounting",
    "make_accountant": "accounting",
    "noise_for_target": "accounting",
    "pure_epsilon_laplace": "accounting",
    "quantize_sigma_down": "accounting",
    "LMOMechanism": "mechanisms",
}

# Spelled out (not derived from _EXPORTS) so that linters and IDEs see the re-exports; a test keeps the two
# in step.
__all__ = [
    "AccountantKind",
    "LMOMechanism",
    "PLDAccountant",
    "PrivacyAccountant",
    "RDPAccountant",
    "StepEvent",
    "compute_epsilon",
    "laplace_scale_for_pure_epsilon",
    "make_accountant",
    "noise_for_target",
    "pure_epsilon_laplace",
    "quantize_sigma_down",
]

if TYPE_CHECKING:
    from dplightning.privacy.accounting import (
        AccountantKind,
        PLDAccountant,
        PrivacyAccountant,
        RDPAccountant,
        StepEvent,
        compute_epsilon,
        laplace_scale_for_pure_epsilon,
        make_accountant,
        noise_for_target,
        pure_epsilon_laplace,
        quantize_sigma_down,
    )
    from dplightning.privacy.mechanisms import LMOMechanism


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
