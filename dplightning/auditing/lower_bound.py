"""Empirical ε lower bound from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023, arXiv 2305.08846).

Setting: m canaries, each inserted into the training set independently with probability ½ (S_i ∈ {−1, +1}).
After training, an auditor guesses "in" for some canaries, "out" for others and abstains on the rest, using only
the trained model. With r guesses and v of them correct, their Theorem 3.1 (δ = 0; Binomial tail) and its
approximate-DP extension (their Theorem 5.2 / the appendix algorithm) bound, for any (ε, δ)-DP training::

    P[V ≥ v] ≤ P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2mδ · max_{1≤i≤v} P[v > Binomial(r, q) ≥ v − i] / i

:func:`p_value` is that right-hand side. The reported lower bound is the largest ε whose p-value is still
below ``1 − confidence``: with probability ≥ ``confidence`` over the canary coin flips and the training
randomness, the training procedure is **not** (ε', δ)-DP for any ε' below it. When several guess counts are
tried, the confidence is split between them (Bonferroni), so picking the best stays valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from dplightning.errors import DPLightningError

DEFAULT_CONFIDENCE = 0.95


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of ≥ ``v`` correct out of ``r`` guesses on ``m`` randomised canaries under (ε, δ)-DP."""
    if not 0 <= v <= r <= m:
        raise DPLightningError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise DPLightningError(f"need ε >= 0 and δ in [0, 1], got ε={epsilon}, δ={delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) ≥ v]
    if v == 0 or delta == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    below = np.cumsum(stats.binom.pmf(v - i, r, q))  # below[i-1] = P[v > Binomial(r, q) ≥ v − i]
    alpha = float((below / i).max())
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float = DEFAULT_CONFIDENCE
) -> float:
    """Largest ε (bisection, 1e-6 relative) with ``p_value(m, r, v, ε, δ) < 1 − confidence``; 0 if none."""
    if not 0.0 < confidence < 1.0:
        raise DPLightningError(f"confidence must be in (0, 1), got {confidence}; e.g. 0.95")
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0  # invariant: p(lo) < alpha ≤ p(hi)
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return lo
    for _ in range(40):  # relative precision 2^-40 of the bracket
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class LowerBound:
    """Outcome of a one-run audit: ε lower bound at ``confidence`` and the guesses it came from."""

    epsilon: float
    confidence: float
    delta: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    choices_tried: int


def one_run_audit(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    delta: float,
    confidence: float = DEFAULT_CONFIDENCE,
    guess_fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
) -> LowerBound:
    """Guess "in" for the ``k/2`` highest-scoring canaries and "out" for the ``k/2`` lowest, for each
    ``k = fraction·m``; return the best bound with the confidence split evenly over the fractions tried.

    Args:
        scores: ``[m]`` membership scores (higher = more likely inserted), computed from the trained model only.
        included: ``[m]`` whether each canary was actually inserted (each with probability ½, independently).
        delta: δ of the DP guarantee being audited.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    inc = np.asarray(included, dtype=bool).reshape(-1)
    m = s.size
    if m == 0 or inc.size != m:
        raise DPLightningError(f"need one score per canary: {m} scores for {inc.size} inclusion flags")
    if not guess_fractions or any(not 0.0 < f <= 1.0 for f in guess_fractions):
        raise DPLightningError("guess_fractions must be fractions in (0, 1]")
    # Split the failure probability over the choices tried (Bonferroni): the max stays a valid bound.
    per_choice = 1.0 - (1.0 - confidence) / len(guess_fractions)
    order = np.argsort(-s, kind="stable")
    best = LowerBound(0.0, confidence, delta, m, 0, 0, len(guess_fractions))
    for fraction in guess_fractions:
        half = max(1, int(fraction * m) // 2)
        half = min(half, m // 2) if m >= 2 else 1
        guess_in, guess_out = order[:half], order[m - half :] if m >= 2 else order[:0]
        r = len(guess_in) + len(guess_out)
        v = int(inc[guess_in].sum() + (~inc[guess_out]).sum())
        eps = epsilon_lower_bound(m, r, v, delta, per_choice)
        if eps > best.epsilon or best.num_guesses == 0:
            best = LowerBound(eps, confidence, delta, m, r, v, len(guess_fractions))
    return best
