"""Lightning callbacks of dplightning (imported as ``dplightning.callbacks``)."""

from dplightning.callbacks.automatic_clipping import AutomaticClipping
from dplightning.callbacks.canary_audit import CanaryAudit
from dplightning.callbacks.membership_inference_audit import MembershipInferenceAudit
from dplightning.callbacks.noise_schedule import NoiseSchedule
from dplightning.callbacks.privacy_budget import PrivacyBudget
from dplightning.callbacks.quantile_clipping import QuantileClipping
from dplightning.callbacks.rldp_controller import RLDPController

__all__ = [
    "AutomaticClipping",
    "CanaryAudit",
    "MembershipInferenceAudit",
    "NoiseSchedule",
    "PrivacyBudget",
    "QuantileClipping",
    "RLDPController",
]
