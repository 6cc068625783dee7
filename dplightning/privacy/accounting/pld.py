"""Privacy-loss-distribution accounting (``dp_accounting.pld``): :class:`PLDAccountant`, tight.

A history of up to :data:`~dplightning.privacy.accounting.base.EXACT_MAX_EVENTS` distinct events (a constant σ,
a schedule of a few) is composed as ``dp_accounting`` composes it: each grid σ once as ``count × event``
(``self_compose``, the PLD counterpart of ``SelfComposedDpEvent``), and the per-σ PLDs along a canonical tree (a
treap whose shape depends only on the set of events), caching every subtree, so that a step recomposes only the
subtrees that contain the changed event. A controller that changes σ as it trains leaves hundreds of distinct σ;
those histories go through :mod:`~dplightning.privacy.accounting.spectral` (one product of Fourier transforms,
never below the pairwise result and ~1e-9 from it): 10,000 steps with σ uniform in [0.6, 1.6] (427 grid σ) take
~1 s instead of ~30 s, and a decision of the controller ~0.1 s. Either way the result is a function of the
compressed history alone: an accountant restored from
:meth:`~dplightning.privacy.accounting.base.PrivacyAccountant.state_dict` reports bit-identical ε.
:meth:`~dplightning.privacy.accounting.base.PrivacyAccountant.epsilon_with` (a budget guard's "would one more step
fit?") composes only the hypothetical extra events onto the cached PLD of the history. A Gaussian release's PLD
is built by :func:`~dplightning.privacy.accounting.gaussian.gaussian_pld`: ``dp_accounting``'s, bit for bit, ~20x
faster.

Discretisation: ``value_discretization_interval`` = :data:`DEFAULT_VALUE_DISCRETIZATION` (5e-4, with
``dp_accounting``'s pessimistic connect-the-dots discretisation, so its error is again an over-estimate).
Measured against a 1e-5 reference, the relative ε error is < 0.1 % for 10^4 steps (MNIST setting: +0.09 %)
and 0.6 % for 10^5 steps at q = 0.001 (it grows roughly like steps × interval²). A budget-guard query
(history PLD ⊗ one more step, then ε) takes 10-40 ms for typical settings (ε ≲ 15), up to ~90 ms for σ ≈ 0.6
or ε ≈ 40; an ``epsilon()`` after a step (recomposing the changed subtrees) ~90 ms for 10^4 steps at one σ.
``dp_accounting``'s default interval of 1e-4 is ~5x slower; 1e-3 is ~2x faster
but 2 % off at 10^5 steps.

**Tiny noise.** A PLD array spans the whole privacy-loss range at that resolution, about 1/σ² nats for the
Gaussian: σ = 1e-6 asked ``dp_accounting`` for petabytes, σ = 0.01 ran for minutes. So before building
anything the accountant sizes each ``count × event`` it composes: one release's loss range from
``dp_accounting``'s connect-the-dots bounds, and for a self-composition the window ``dp_accounting`` will
allocate (its Chernoff bound, which is set in nats and so is measured on a cheap 2048-point probe PLD); the
spectral composition sizes its own window before it allocates anything. Where an array would exceed :data:`PLD_MAX_POINTS` the whole query (PLDs compose only on one grid) moves to the grid
``interval · 2^k`` that fits, and a composition that still outgrows the limit restarts one grid coarser. The
pessimistic discretisation is an upper bound on any grid, and where this happens ε is in the hundreds or more,
so the coarse grid costs little (σ = 0.05, q = 0.01, 300 steps: ε = 2525.66 on a grid of 0.032 in 0.18 s,
2525.64 on 5e-4 in 13 s; see ``benchmarks/results/accountant_small_sigma.md``). Settings with ε ≲ 40 never
reach the limit. Past the coarsest usable grid (e^interval must stay far from overflow), and for Laplace / LMO
releases whose worst-case loss exceeds 700 nats (``dp_accounting`` and :mod:`~dplightning.privacy.lmo_accounting`
hold e^loss in float64), ε comes from RDP instead: ``dp_accounting``'s for the Gaussian and the full-batch
Laplace mechanism, otherwise the pure-DP bound ε₀ = log(1 + q(e^L − 1)) of the release (L = 1/scale, or
K/multiplier for LMO) as the RDP curve min(ε₀, αε₀²/2). RDP is the last resort because it is much looser there
(σ = 0.01, q = 0.01, 300 steps: 1.63e6 against the coarse PLD's 6.48e4) while both answer within a fraction of
a second.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.pld import privacy_loss_mechanism as pld_mechanism
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from scipy import special

from dplightning.errors import DPLightningError
from dplightning.privacy import lmo_accounting
from dplightning.privacy.accounting.base import AccountantKind, PrivacyAccountant, _EventCounts
from dplightning.privacy.accounting.events import StepEvent, _as_float, _sort_key
from dplightning.privacy.accounting.gaussian import gaussian_loss_range, gaussian_pld
from dplightning.privacy.accounting.pure import _MAX_RELEASE_LOSS, _pure_step_epsilon, _release_loss_bound
from dplightning.privacy.accounting.rdp import _pure_rdp_curve, _rdp_curve
from dplightning.privacy.accounting.spectral import Oversized as _Oversized
from dplightning.privacy.accounting.spectral import Pmfs, SpectralComposer

__all__ = ["DEFAULT_VALUE_DISCRETIZATION", "PLD_MAX_POINTS", "PLDAccountant"]

DEFAULT_VALUE_DISCRETIZATION = 5e-4
"""``value_discretization_interval`` of the PLD accountant (see the module docstring for the measurements)."""

PLD_MAX_POINTS = 2**18
"""Most points of one PLD probability array before :class:`PLDAccountant` coarsens its loss grid (tiny noise,
see the module docstring). Read when a query is first answered, so change it only in a fresh process (setting
it on :mod:`dplightning.privacy.accounting` sets it here)."""

# coarsest PLD loss grid: dp_accounting needs e^interval far from float64 overflow (e^709)
_PLD_MAX_INTERVAL = 300.0
_PROBE_POINTS = 2048  # resolution of the probe PLD that sizes dp_accounting's self-composition window
_TAIL_MASS = 1e-15  # dp_accounting's default tail_mass_truncation of compose / self_compose


def _single_release_pld(event: StepEvent, interval: float) -> pld_lib.PrivacyLossDistribution:
    """PLD of a single release of ``event`` (what ``dp_accounting.pld.PLDAccountant`` builds for it)."""
    if event.mechanism == "gaussian":  # from_gaussian_mechanism's arrays, bit for bit, ~20x faster
        return gaussian_pld(event.noise_multiplier, event.sample_rate, interval)
    if event.mechanism == "lmo":
        assert event.lmo is not None
        return lmo_accounting.lmo_pld(event.lmo, 1.0 / event.noise_multiplier, event.sample_rate, interval)
    return pld_lib.from_laplace_mechanism(
        parameter=event.noise_multiplier,
        sampling_prob=event.sample_rate,
        value_discretization_interval=interval,
    )


@lru_cache(maxsize=128)
def _base_pld(event: StepEvent, interval: float) -> pld_lib.PrivacyLossDistribution:
    """:func:`_single_release_pld`, cached."""
    return _single_release_pld(event, interval)


@lru_cache(maxsize=8)
def _self_composed_pld(event: StepEvent, count: int, interval: float) -> pld_lib.PrivacyLossDistribution:
    """PLD of ``count`` releases of ``event``, i.e. of ``SelfComposedDpEvent(event.to_dp_event(), count)``."""
    unit, times = _unit(event, count)
    base = _base_pld(unit, interval)
    return base if times == 1 else base.self_compose(times)


def _unit(event: StepEvent, count: int) -> tuple[StepEvent, int]:
    """``count × event`` as ``(release, times)``: the release whose PLD is composed ``times`` times."""
    if event.mechanism == "gaussian" and event.sample_rate == 1.0:
        # As dp_accounting: count Gaussian releases are one Gaussian of std σ/√count (exact, one discretisation).
        return StepEvent(event.noise_multiplier / math.sqrt(count), 1.0), 1
    return event, count


def _unit_pmfs(event: StepEvent, interval: float) -> Pmfs:
    """Dense PMFs (remove[, add]) of one release of ``event``, for the spectral composition."""
    return tuple(pmf.to_dense_pmf() for pmf in _pmfs(_base_pld(event, interval)))


def _priority(event: StepEvent) -> int:
    """Deterministic pseudo-random treap priority (``hash()`` is salted per process, so not usable)."""
    digest = hashlib.blake2b(repr(_sort_key(event)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


# ----------------------------------------------------------------------------------- PLD size (tiny noise)


def _pmfs(pld: pld_lib.PrivacyLossDistribution) -> tuple[Any, ...]:
    # dp_accounting has no public accessor for a PLD's size or probabilities; its two PMFs (remove / add
    # adjacency, the same object when symmetric) are the attributes below in every release since 0.4.
    return (pld._pmf_remove,) if pld._symmetric else (pld._pmf_remove, pld._pmf_add)


def _checked(pld: pld_lib.PrivacyLossDistribution) -> pld_lib.PrivacyLossDistribution:
    """``pld``, unless one of its arrays exceeds :data:`PLD_MAX_POINTS` (then :class:`_Oversized`)."""
    points = max(pmf.size for pmf in _pmfs(pld))
    if points > PLD_MAX_POINTS:
        raise _Oversized(points)
    return pld


@lru_cache(maxsize=1024)
def _loss_range(event: StepEvent) -> float:
    """Width (nats) of the loss support the PLD of one release of ``event`` spans; ``inf`` if it overflows."""
    if event.mechanism == "lmo":
        return 2.0 * _release_loss_bound(event)  # |log r| ≤ K·Δ; subsampling only shrinks the loss
    if event.mechanism == "gaussian":  # dp_accounting's connect-the-dots bounds, without building its objects
        return gaussian_loss_range(event.noise_multiplier, event.sample_rate)
    loss_class = pld_mechanism.LaplacePrivacyLoss
    adjacencies = [pld_mechanism.AdjacencyType.REMOVE]
    if event.sample_rate < 1.0:
        adjacencies.append(pld_mechanism.AdjacencyType.ADD)
    width = 0.0
    try:
        with np.errstate(all="ignore"):
            for adjacency in adjacencies:
                loss = loss_class(
                    event.noise_multiplier, sampling_prob=event.sample_rate, adjacency_type=adjacency
                )
                bounds = loss.connect_dots_bounds()
                width = max(width, float(bounds.epsilon_upper - bounds.epsilon_lower))
    except (ArithmeticError, ValueError):  # σ so small that 1/σ² overflows
        return math.inf
    return width if math.isfinite(width) else math.inf


@lru_cache(maxsize=64)
def _probe_pld(event: StepEvent) -> tuple[float, pld_lib.PrivacyLossDistribution]:
    """``(interval, PLD)`` of one release on a grid of about :data:`_PROBE_POINTS` points (cheap at any σ)."""
    interval = min(_loss_range(event) / _PROBE_POINTS, _PLD_MAX_INTERVAL)
    return interval, _single_release_pld(event, interval)


@lru_cache(maxsize=1024)
def _self_composed_width(event: StepEvent, count: int) -> float:
    """Span (nats) of the window that ``self_compose(count)`` allocates: ``dp_accounting``'s Chernoff bound.

    Its orders are set relative to the loss range, so the window in nats barely depends on the grid: it is
    measured on the probe PLD, where it is cheap, instead of on the (possibly huge) real one.
    """
    interval, probe = _probe_pld(event)
    return interval * max(_self_convolve_points(pmf.to_dense_pmf()._probs, count) for pmf in _pmfs(probe))


def _self_convolve_points(probs: np.ndarray, count: int) -> int:
    """Length of the window ``dp_accounting.pld.common.self_convolve`` allocates for ``count`` × ``probs``.

    The same Chernoff bound as its ``compute_self_convolve_bounds`` (same orders, same rounding), evaluated
    for all orders in one vectorised call instead of forty: this runs on every step of a training run.
    """
    size = len(probs)
    orders = np.concatenate((np.arange(-20, 0), np.arange(1, 21))) / size
    log_mgfs = special.logsumexp(np.outer(orders, np.arange(size)), b=probs, axis=1)
    with np.errstate(all="ignore"):
        bounds = (count * log_mgfs + math.log(2 / _TAIL_MASS)) / orders
    usable = np.isfinite(bounds)
    upper = min([(size - 1) * count, *np.ceil(bounds[usable & (orders > 0)]).astype(np.int64).tolist()])
    lower = max([0, *np.floor(bounds[usable & (orders < 0)]).astype(np.int64).tolist()])
    return upper - lower + 1


def _leaf_width(event: StepEvent, count: int, interval: float) -> float:
    """Span (nats) of the largest array built for ``count × event`` on ``interval`` (``inf``: no PLD)."""
    if _release_loss_bound(event) > _MAX_RELEASE_LOSS:
        return math.inf
    if event.mechanism == "gaussian" and event.sample_rate == 1.0:  # one Gaussian of std σ/√count
        return _loss_range(StepEvent(event.noise_multiplier / math.sqrt(count), 1.0))
    width = _loss_range(event)
    if count == 1 or count * width / interval <= PLD_MAX_POINTS:  # the window is at most count × the base
        return width
    if width / _PLD_MAX_INTERVAL > PLD_MAX_POINTS:  # not even one release fits: no probe needed
        return math.inf
    return max(width, _self_composed_width(event, count))


def _grid_for(interval: float, width: float) -> float:
    """``interval · 2^k`` for the smallest k ≥ 0 with ``width / (interval · 2^k) ≤ PLD_MAX_POINTS``.

    Doubling keeps the grids of different queries nested and few (so caches hit); ``inf`` past
    :data:`_PLD_MAX_INTERVAL` (the caller then falls back to RDP).
    """
    if not math.isfinite(width):
        return math.inf
    if width / interval <= PLD_MAX_POINTS:
        return interval
    coarse = interval * 2.0 ** math.ceil(math.log2(width / (interval * PLD_MAX_POINTS)))
    return coarse if coarse <= _PLD_MAX_INTERVAL else math.inf


@lru_cache(maxsize=4096)
def _leaf_interval(event: StepEvent, count: int, interval: float) -> float:
    """Grid on which ``count × event`` fits :data:`PLD_MAX_POINTS`, from ``interval`` up (``inf``: none)."""
    return _grid_for(interval, _leaf_width(event, count, interval))


def _coarser(interval: float, points: int) -> float:
    """Grid for a composition that came out with ``points`` (> :data:`PLD_MAX_POINTS`) on ``interval``."""
    return _grid_for(interval, points * interval)


def _fallback_rdp_curve(event: StepEvent, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one release for the PLD accountant's fallback (also Poisson-subsampled Laplace, via pure DP)."""
    if event.mechanism == "laplace" and event.sample_rate < 1.0:
        return _pure_rdp_curve(_pure_step_epsilon(_release_loss_bound(event), event.sample_rate), orders)
    return _rdp_curve(event, orders)


def _rdp_fallback_epsilon(pairs: _EventCounts, delta: float) -> float:
    """ε of ``(event, count)`` pairs by RDP at ``dp_accounting``'s default orders: sound, looser than PLD."""
    orders = tuple(float(a) for a in rdp_lib.DEFAULT_RDP_ORDERS)
    total = np.zeros(len(orders))
    for event, count in sorted(pairs, key=lambda kv: _sort_key(kv[0])):
        total += count * _fallback_rdp_curve(event, orders)
    eps, _ = rdp_lib.compute_epsilon(np.array(orders), total, delta)
    return float(eps)


# ------------------------------------------------------------------------------------------ PLD accountant

_Tree = tuple[
    dict[bytes, pld_lib.PrivacyLossDistribution], dict[StepEvent, tuple[int, pld_lib.PrivacyLossDistribution]]
]


class PLDAccountant(PrivacyAccountant):
    """Privacy-loss-distribution accounting (``dp_accounting.pld``): tight ε, composed per grid σ along a treap.

    Args:
        value_discretization_interval: PLD loss grid; smaller is more accurate and slower (error ~ interval²).
            Queries whose arrays would exceed :data:`PLD_MAX_POINTS` use a coarser one (module docstring).
    """

    kind: ClassVar[AccountantKind] = "pld"

    def __init__(self, value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION) -> None:
        super().__init__()
        self._interval = self._check_interval(value_discretization_interval)
        self._trees: dict[float, _Tree] = {}  # per loss grid: subtree PLDs by digest, leaf PLDs by event
        self._spectral = SpectralComposer(_unit, _unit_pmfs)  # histories of many distinct events
        self._natural: tuple[float, pld_lib.PrivacyLossDistribution | None] | None = None
        self._coarse: dict[float, pld_lib.PrivacyLossDistribution] = {}

    @staticmethod
    def _check_interval(value: Any) -> float:
        interval = _as_float(value, "value_discretization_interval")
        if not (math.isfinite(interval) and 0 < interval <= 0.1):
            raise DPLightningError(
                f"value_discretization_interval must be in (0, 0.1], got {value!r}; the default is "
                f"{DEFAULT_VALUE_DISCRETIZATION}"
            )
        return interval

    @property
    def value_discretization_interval(self) -> float:
        """The PLD loss discretisation interval."""
        return self._interval

    def _canonical(self, event: StepEvent) -> StepEvent:
        if event.mechanism == "lmo" and event.release == "vector":
            raise DPLightningError(
                "LMO noise on a vector (L1 clipping) is accounted with RDP only (its bound needs the RDP curve's "
                "convexity in the shift); use accountant='rdp'"
            )
        return super()._canonical(event)

    def _history_changed(self) -> None:
        self._natural = None
        self._coarse = {}

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "value_discretization_interval": self._interval}

    def _load_settings(self, state: dict[str, Any]) -> None:
        super()._load_settings(state)
        self._interval = self._check_interval(state.get("value_discretization_interval", self._interval))
        self._trees = {}
        self._spectral = SpectralComposer(_unit, _unit_pmfs)

    def history_pld(self) -> pld_lib.PrivacyLossDistribution | None:
        """The composed PLD of the history, cached; ``None`` if empty, if some step had no noise, or if no
        grid up to the coarsest fits :data:`PLD_MAX_POINTS` (ε then comes from RDP). Its grid is
        :attr:`value_discretization_interval` unless the history is too large for it."""
        return self._history_natural()[1]

    def _history_natural(self) -> tuple[float, pld_lib.PrivacyLossDistribution | None]:
        if self._natural is None:
            self._natural = self._compose_history()
        return self._natural

    def _compose_history(self) -> tuple[float, pld_lib.PrivacyLossDistribution | None]:
        """``(grid, PLD)`` of the history on the finest grid that fits :data:`PLD_MAX_POINTS`: ``(inf, None)``
        if none does, ``(value_discretization_interval, None)`` if empty or some step had no noise."""
        if not self._history or any(e.noise_multiplier == 0 for e in self._history):
            self._trees = {}
            self._spectral = SpectralComposer(_unit, _unit_pmfs)
            return self._interval, None
        if self._exact():  # every self-composition must fit
            parts = list(self._history.items())
        else:  # one release of each must fit; the spectral product sizes the whole composition itself
            parts = [(_unit(e, c)[0], 1) for e, c in self._history.items()]
        interval = max(_leaf_interval(e, c, self._interval) for e, c in parts)
        while math.isfinite(interval):
            try:
                return interval, self._compose_on(interval)
            except _Oversized as exc:
                interval = _coarser(interval, exc.points)
        return math.inf, None

    def _history_on(self, interval: float) -> pld_lib.PrivacyLossDistribution | None:
        """The history's PLD on ``interval`` (≥ its own grid); ``None`` if empty. May raise _Oversized."""
        if not self._history:
            return None
        natural, pld = self._history_natural()
        if interval == natural:
            return pld
        if interval not in self._coarse:
            self._coarse[interval] = self._compose_on(interval)
        return self._coarse[interval]

    def _compose_on(self, interval: float) -> pld_lib.PrivacyLossDistribution:
        """The history's PLD on ``interval``: pairwise along the treap for up to
        :data:`~dplightning.privacy.accounting.base.EXACT_MAX_EVENTS` distinct events (``dp_accounting``'s
        compositions, bit for bit), else by the spectral product (never below the pairwise result, ~1e-9 from
        it). May raise _Oversized."""
        if self._exact():
            return self._treap(interval)
        self._trees = {}  # the history has outgrown the pairwise tree for good
        return self._spectral.compose(list(self._history.items()), interval, PLD_MAX_POINTS)

    def _tree(self, interval: float) -> _Tree:
        """The subtree and leaf caches of ``interval``'s grid; those of the two grids used last are kept."""
        tree = self._trees.pop(interval, None) or ({}, {})
        self._trees[interval] = tree
        while len(self._trees) > 2:
            del self._trees[next(iter(self._trees))]
        return tree

    def _treap(self, interval: float) -> pld_lib.PrivacyLossDistribution:
        """Compose the per-event PLDs on ``interval`` along a treap keyed by event (priority = event hash).

        The treap's shape depends only on the set of events, each subtree's PLD is cached under a digest of its
        content, and a step changes one event's count: only the subtrees on that event's path (expected
        O(log k) of them) are recomposed, and the result does not depend on the order of the steps.
        Raises :class:`_Oversized` if a composition outgrows :data:`PLD_MAX_POINTS`.
        """
        items = sorted(self._history.items(), key=lambda kv: _sort_key(kv[0]))
        old_nodes, leaves = self._tree(interval)
        n = len(items)
        priority = [_priority(e) for e, _ in items]
        left, right = [-1] * n, [-1] * n
        stack: list[int] = []
        for i in range(n):  # Cartesian tree (max-heap on priority) in O(n)
            last = -1
            while stack and priority[stack[-1]] < priority[i]:
                last = stack.pop()
            left[i] = last
            if stack:
                right[stack[-1]] = i
            stack.append(i)
        root = stack[0]
        digests: list[bytes] = [b""] * n
        values: list[Any] = [None] * n
        nodes: dict[bytes, pld_lib.PrivacyLossDistribution] = {}
        # iterative post-order: children before parents
        order: list[int] = []
        todo = [root]
        while todo:
            i = todo.pop()
            order.append(i)
            todo.extend(c for c in (left[i], right[i]) if c >= 0)
        for i in reversed(order):
            event, count = items[i]
            lo, hi = left[i], right[i]
            h = hashlib.blake2b(digest_size=16)
            h.update(digests[lo] if lo >= 0 else b"-")
            h.update(repr((*_sort_key(event), count)).encode())
            h.update(digests[hi] if hi >= 0 else b"-")
            key = h.digest()
            pld = old_nodes.get(key)
            if pld is None:
                pld = self._leaf(event, count, interval, leaves)
                if lo >= 0:
                    pld = _checked(values[lo].compose(pld))
                if hi >= 0:
                    pld = _checked(pld.compose(values[hi]))
            nodes[key] = pld
            digests[i], values[i] = key, pld
        self._trees[interval] = (nodes, leaves)  # keep exactly the current tree's subtrees
        return values[root]

    @staticmethod
    def _leaf(
        event: StepEvent,
        count: int,
        interval: float,
        leaves: dict[StepEvent, tuple[int, pld_lib.PrivacyLossDistribution]],
    ) -> pld_lib.PrivacyLossDistribution:
        """PLD of ``count × event``, kept per event while it is in the history (the tree needs it again)."""
        cached = leaves.get(event)
        if cached is not None and cached[0] == count:
            return cached[1]
        leaf = _self_composed_pld(event, count, interval)
        leaves[event] = (count, leaf)
        return leaf

    def _epsilon(self, delta: float, extra: _EventCounts) -> float:
        # PLDs compose only on one grid: the query's is the coarsest any of its parts needs
        natural = self._history_natural()[0] if self._history else self._interval
        interval = max([natural, *(_leaf_interval(e, c, self._interval) for e, c in extra)])
        while math.isfinite(interval):
            try:
                return self._pld_epsilon(delta, extra, interval)
            except _Oversized as exc:
                interval = _coarser(interval, exc.points)
        return _rdp_fallback_epsilon([*self._history.items(), *extra], delta)

    def _pld_epsilon(self, delta: float, extra: _EventCounts, interval: float) -> float:
        pld = self._history_on(interval)
        for event, count in extra:
            part = _self_composed_pld(event, count, interval)
            pld = part if pld is None else _checked(pld.compose(part))
        assert pld is not None
        return float(pld.get_epsilon_for_delta(delta))
