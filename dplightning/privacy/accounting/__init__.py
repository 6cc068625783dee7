"""Privacy accounting over Google's ``dp_accounting``: PLD (default, tight) and RDP (optional).

One interface, :class:`PrivacyAccountant`, two implementations, in the style of ``dp_accounting``: an
accountant records small immutable :class:`StepEvent` releases and answers ``epsilon(delta)``. All the
privacy mathematics (privacy loss distributions, RDP curves, RDP → (ε, δ) conversion) is ``dp_accounting``'s;
this package decides *which* events are composed, caches, and calibrates noise to a target.

- :mod:`.events` — :class:`StepEvent` and the mechanism / release names;
- :mod:`.base` — :class:`PrivacyAccountant` (history, checkpoint state) and the σ grid it records on;
- :mod:`.pld` — :class:`PLDAccountant` and its guard against oversized PLDs at tiny noise;
- :mod:`.spectral` — the PLD accountant's composition of many distinct events (an adaptive run) in one product
  of Fourier transforms;
- :mod:`.rdp` — :class:`RDPAccountant`;
- :mod:`.gaussian` — the Poisson-subsampled Gaussian vectorised: its PLD (``dp_accounting``'s, bit for bit) and
  its RDP curves for many σ at once;
- :mod:`.pure` — pure ε-DP of Laplace noise and its inverse;
- :mod:`.calibration` — :func:`compute_epsilon`, :func:`noise_for_target` and :func:`smallest_passing`, the
  search every calibration uses.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from dplightning.privacy.accounting import pld as _pld
from dplightning.privacy.accounting import rdp as _rdp
from dplightning.privacy.accounting.base import (
    ACCOUNTANTS,
    EXACT_MAX_EVENTS,
    SIGMA_GRID_PER_DECADE,
    Accountant,
    AccountantKind,
    PrivacyAccountant,
    quantize_sigma_down,
    sigma_from_grid_index,
    sigma_grid_index,
)
from dplightning.privacy.accounting.calibration import (
    SIGMA_SEARCH_RANGE,
    compute_epsilon,
    make_accountant,
    noise_for_target,
    smallest_passing,
)
from dplightning.privacy.accounting.events import MECHANISMS, RELEASES, Mechanism, Release, StepEvent
from dplightning.privacy.accounting.pld import (
    DEFAULT_VALUE_DISCRETIZATION,
    PLD_MAX_POINTS,
    PLDAccountant,
)
from dplightning.privacy.accounting.pure import (
    PureLaplaceAccountant,
    laplace_scale_for_pure_epsilon,
    pure_epsilon_laplace,
)
from dplightning.privacy.accounting.rdp import RDPAccountant

__all__: list[str] = [
    "ACCOUNTANTS",
    "DEFAULT_VALUE_DISCRETIZATION",
    "EXACT_MAX_EVENTS",
    "MECHANISMS",
    "PLD_MAX_POINTS",
    "RELEASES",
    "SIGMA_GRID_PER_DECADE",
    "SIGMA_SEARCH_RANGE",
    "Accountant",
    "AccountantKind",
    "Mechanism",
    "PLDAccountant",
    "PrivacyAccountant",
    "PureLaplaceAccountant",
    "RDPAccountant",
    "Release",
    "StepEvent",
    "compute_epsilon",
    "laplace_scale_for_pure_epsilon",
    "make_accountant",
    "noise_for_target",
    "pure_epsilon_laplace",
    "quantize_sigma_down",
    "sigma_from_grid_index",
    "sigma_grid_index",
    "smallest_passing",
]

# The module-level caches and the PLD size guard's internals, reachable here too: tests inspect them, and a
# benchmark that must start cold empties every cache it finds in this namespace.
_base_pld = _pld._base_pld
_self_composed_pld = _pld._self_composed_pld
_loss_range = _pld._loss_range
_probe_pld = _pld._probe_pld
_self_composed_width = _pld._self_composed_width
_leaf_interval = _pld._leaf_interval
_pmfs = _pld._pmfs
_rdp_curve = _rdp._rdp_curve
_vectorised_rdp_curves = _rdp._vectorised_rdp_curves

_FORWARDED = frozenset({"PLD_MAX_POINTS"})


class _Package(types.ModuleType):
    """This package, with :data:`PLD_MAX_POINTS` settable here as well as on :mod:`.pld`.

    The limit is a process-wide setting and has always been set as ``accounting.PLD_MAX_POINTS = ...`` (tests
    lower it, a benchmark lifts it); the PLD accountant reads the one in its own module, so a write here is
    passed on to it.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FORWARDED:
            setattr(_pld, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
