"""Lightning callbacks of dplightning (imported as ``dplightning.callbacks``)."""

from dplightning.callbacks.privacy_budget import PrivacyBudget

__all__ = ["PrivacyBudget"]
