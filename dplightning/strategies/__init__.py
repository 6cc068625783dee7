"""Lightning strategies that compute private updates."""

from dplightning.strategies.dpsgd import DDPDPSGDStrategy, DPSGDStrategy
from dplightning.strategies.dpzo import DPZOStrategy

__all__ = ["DDPDPSGDStrategy", "DPSGDStrategy", "DPZOStrategy"]
