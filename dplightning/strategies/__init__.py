"""Lightning strategies that compute private updates."""

from dplightning.strategies.dpsgd import DPSGDStrategy

__all__ = ["DPSGDStrategy"]
