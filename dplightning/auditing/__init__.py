"""Privacy audits: membership inference, canary exposure and extraction, one-run empirical ε lower bounds.

Flat, single-purpose modules (no Lightning imports in the maths): :mod:`.membership`, :mod:`.canaries`,
:mod:`.lower_bound`; :mod:`.cli` is ``dplightning audit``.
"""
