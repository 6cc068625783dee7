"""Lightning callbacks of dplightning (imported as ``dplightning.callbacks``)."""

from dplightning.callbacks.privacy_budget import PrivacyBudget
from dplightning.callbacks.rldp_controller import RLDPController

__all__ = ["PrivacyBudget", "RLDPController"]
