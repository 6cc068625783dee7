"""Lightning strategies that compute private updates."""

from dplightning.strategies.dpsgd import DDPDPSGDStrategy, DPSGDStrategy

__all__ = ["DDPDPSGDStrategy", "DPSGDStrategy"]
