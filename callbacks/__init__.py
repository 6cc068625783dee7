"""Lightning callbacks of dplightning (imported as ``dplightning.callbacks``).

Each callback is imported on first access (PEP 562 module ``__getattr__``), not when the package is: the
controllers pull in heavy optional stacks (``RLDPController``: stable-baselines3 and gymnasium) that a run
using only ``PrivacyBudget`` must not pay for, and ``from dplightning.callbacks import PrivacyBudget`` reads as
before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dplightning._lazy import lazy_exports

# Public name -> submodule of this package that defines it.
_EXPORTS: dict[str, str] = {
    "AutomaticClipping": "automatic_clipping",
    "CanaryAudit": "canary_audit",
    "DownstreamAccuracy": "downstream_accuracy",
    "FineTuneReport": "fine_tune_report",
    "MembershipInferenceAudit": "membership_inference_audit",
    "NoiseSchedule": "noise_schedule",
    "PlateauController": "plateau_controller",
    "PrivacyBudget": "privacy_budget",
    "QuantileClipping": "quantile_clipping",
    "RLDPController": "rldp_controller",
}

# Spelled out (not derived from _EXPORTS) so that linters and IDEs see the re-exports; a test keeps the two
# in step.
__all__ = [
    "AutomaticClipping",
    "CanaryAudit",
    "DownstreamAccuracy",
    "FineTuneReport",
    "MembershipInferenceAudit",
    "NoiseSchedule",
    "PlateauController",
    "PrivacyBudget",
    "QuantileClipping",
    "RLDPController",
]

if TYPE_CHECKING:  # static analysers see the real classes; nothing is imported at run time
    from dplightning.callbacks.automatic_clipping import AutomaticClipping
    from dplightning.callbacks.canary_audit import CanaryAudit
    from dplightning.callbacks.downstream_accuracy import DownstreamAccuracy
    from dplightning.callbacks.fine_tune_report import FineTuneReport
    from dplightning.callbacks.membership_inference_audit import MembershipInferenceAudit
    from dplightning.callbacks.noise_schedule import NoiseSchedule
    from dplightning.callbacks.plateau_controller import PlateauController
    from dplightning.callbacks.privacy_budget import PrivacyBudget
    from dplightning.callbacks.quantile_clipping import QuantileClipping
    from dplightning.callbacks.rldp_controller import RLDPController


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
