"""What this machine is good at: whether bf16 is fast, what ``precision: auto`` becomes, how many threads to use.

Precision. ``bf16-mixed`` runs the forward under ``torch.autocast`` (weights, optimizer state and every
privacy computation stay float32/float64). It only pays off where bf16 matrix products run in hardware:

- CPU: the ``avx512_bf16`` (AVX-512 BF16, e.g. AMD Zen 4, Intel Cooper Lake) or ``amx_bf16`` (Intel AMX,
  Sapphire Rapids and later) flag in ``/proc/cpuinfo``. Without them bf16 is converted in software and
  is usually no faster than float32.
- CUDA: :func:`torch.cuda.is_bf16_supported` (Ampere and later).

:func:`resolve_precision` turns ``"auto"`` into ``"bf16-mixed"`` there and ``"32-true"`` elsewhere, except
for zeroth-order strategies (DP-ZO), which stay ``"32-true"``: their signal is the difference of two losses a
distance 2μ apart, and on SmolLM2-135M bf16 rounding of the activations is as large as that difference. There,
bf16 and float32 per-example differences along the same directions correlated 0.17 at μ = 1e-3 (DPZOStrategy's
default; the bf16 spread was 4.6× the float32 one) and 0.92 at μ = 1e-2
(``benchmarks/results/throughput.md``); on the 64-wide tiny test model they agree (≥ 0.99), which is why the
tiny model cannot vouch for bf16 here. Any explicit precision is passed through untouched.

Threads. :func:`resolve_threads` is the policy of a single ``dplightning`` run: ``$DPLIGHTNING_THREADS`` if
set, else ``$OMP_NUM_THREADS`` if set, else every core this process may run on. torch's own default can be
lower (it counts physical cores, and a container's CPU quota is not a core count). On cores shared with other
busy processes fewer threads can be faster: every parallel region waits for its slowest thread, and a
descheduled one stalls the step (on the shared 2-core development machine, steps of 5 s took up to 130 s);
set ``DPLIGHTNING_THREADS=1`` there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from dplightning.errors import DPLightningError

BF16_CPU_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")
"""``/proc/cpuinfo`` flags that mean bf16 matrix products run in hardware."""

AUTO = "auto"
THREADS_ENV = "DPLIGHTNING_THREADS"


# ------------------------------------------------------------------------------------------ precision
@lru_cache(maxsize=4)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first core listed in ``cpuinfo`` (empty where it cannot be read: not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def bf16_is_fast(device: Any = "cpu") -> bool:
    """Whether bf16 mixed precision is faster than float32 on ``device`` (``"cpu"``, ``"cuda"``, a
    :class:`torch.device`): hardware bf16 matrix products (see the module docstring)."""
    kind = getattr(device, "type", None) or str(device).split(":", 1)[0]
    if kind == "cpu":
        return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    if kind == "cuda":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False


def _device_kind(accelerator: Any, strategy: Any) -> str:
    """``"cpu"``, ``"cuda"`` or another accelerator name: where the run will compute."""
    root = None
    try:
        root = getattr(strategy, "root_device", None)  # SingleDeviceStrategy knows its device before setup
    except Exception:  # a parallel strategy without its devices yet
        root = None
    if root is not None:
        return str(getattr(root, "type", root))
    if accelerator is None or isinstance(accelerator, str):
        name = (accelerator or AUTO).lower()
    else:
        name = type(accelerator).__name__.lower()  # CPUAccelerator, CUDAAccelerator, ...
    if "cpu" in name:
        return "cpu"
    if name in ("gpu", "cuda") or "cuda" in name:
        return "cuda"
    if name == AUTO:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def is_zeroth_order(strategy: Any) -> bool:
    """Whether ``strategy`` estimates gradients from loss differences (DP-ZO and its subclasses): an instance, or
    the name of a preset registered in Lightning's ``StrategyRegistry`` (a user's, with its budget)."""
    if strategy is None:
        return False
    from dplightning.strategies.dpzo import DPZOStrategy

    if isinstance(strategy, str):
        from lightning.pytorch.strategies import StrategyRegistry

        if strategy not in StrategyRegistry:
            return False
        registered = StrategyRegistry[strategy]["strategy"]
        return isinstance(registered, type) and issubclass(registered, DPZOStrategy)
    return isinstance(strategy, DPZOStrategy)


def resolve_precision(precision: Any, *, accelerator: Any = None, strategy: Any = None) -> Any:
    """``precision`` with ``"auto"`` replaced by ``"bf16-mixed"`` where bf16 is fast, else ``"32-true"``.

    Zeroth-order strategies always get ``"32-true"`` from ``"auto"`` (see the module docstring). Anything but
    ``"auto"`` (``None``, ``32``, ``"bf16-mixed"``, ...) is returned unchanged.
    """
    if not (isinstance(precision, str) and precision.strip().lower() == AUTO):
        return precision
    if is_zeroth_order(strategy):
        return "32-true"
    return "bf16-mixed" if bf16_is_fast(_device_kind(accelerator, strategy)) else "32-true"


# -------------------------------------------------------------------------------------------- threads
def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _omp_threads(value: str) -> int | None:
    # OpenMP allows a nesting list ("4,2"): the first entry is the outer team, which is what torch uses.
    try:
        n = int(value.split(",", 1)[0].strip())
    except ValueError:
        return None
    return n if n > 0 else None


def resolve_threads(env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """``(threads, source)`` for a single run: ``$DPLIGHTNING_THREADS``, else ``$OMP_NUM_THREADS``, else all
    available cores (``source`` names which). A bad ``DPLIGHTNING_THREADS`` is a one-line error; a malformed
    ``OMP_NUM_THREADS`` is ignored (OpenMP itself ignores it too)."""
    env = os.environ if env is None else env
    raw = env.get(THREADS_ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise DPLightningError(
                f"{THREADS_ENV}={raw!r} is not a positive integer; unset it or set e.g. {THREADS_ENV}=2"
            )
        return n, THREADS_ENV
    omp = _omp_threads(env.get("OMP_NUM_THREADS", ""))
    if omp is not None:
        return omp, "OMP_NUM_THREADS"
    return available_cores(), "all cores"


def apply_thread_policy(env: dict[str, str] | None = None) -> int:
    """Set torch's intra-op threads by :func:`resolve_threads`; returns the count.

    An explicit ``DPLIGHTNING_THREADS`` is also exported as ``OMP_NUM_THREADS``: Lightning's multi-process
    launchers divide the cores between processes unless ``OMP_NUM_THREADS`` is set, and child processes
    inherit it. Without either variable nothing is exported, so a DDP run still gets Lightning's split.
    """
    import torch

    target = os.environ if env is None else env
    threads, source = resolve_threads(target)
    if source == THREADS_ENV:
        target["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads
