"""One exception type for user-facing errors: a single line naming the problem and the fix."""

from __future__ import annotations


class DPLightningError(ValueError):
    """Bad input from the user (config, file, budget, model).

    The message is one line: what is wrong, then how to fix it. The CLI prints it without a traceback.
    """


class PrivacyBudgetError(DPLightningError):
    """The requested privacy budget cannot be met (e.g. target ε unreachable with the planned steps)."""
