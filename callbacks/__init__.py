"""Lightning callbacks of dplightning (imported as ``dplightning.callbacks``)."""

from dplightning.callbacks.automatic_clipping import AutomaticClipping
from dplightning.callbacks.noise_schedule import NoiseSchedule
from dplightning.callbacks.privacy_budget import PrivacyBudget
from dplightning.callbacks.quantile_clipping import QuantileClipping
from dplightning.callbacks.rldp_controller import RLDPController

__all__ = ["AutomaticClipping", "NoiseSchedule", "PrivacyBudget", "QuantileClipping", "RLDPController"]
