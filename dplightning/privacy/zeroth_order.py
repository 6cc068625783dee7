"""Zeroth-order (SPSA) directional derivatives with directions regenerated from seeds: the estimator DP-ZO
privatises. Pure torch, no Lightning.

Perturbation (``perturbation=``):

- ``"swap"`` (default): θ is never written during the two forwards. Forward pre-hooks on every module that
  owns a trainable parameter swap in a temporary ``θ_p ± μ z_p`` (one parameter-sized tensor per module call)
  and forward hooks put the original ``Parameter`` back, so θ is restored bit-exactly by construction.
- ``"inplace"``: MeZO's ``θ += μz; θ −= 2μz; θ += μz`` on the parameter storage in 1 M-element chunks. Works
  for any module, but floating-point rounding leaves a drift of a few ulps of ``μ|z|`` per step.

In both modes ``z`` is never stored whole: it is regenerated chunk by chunk from a per-(step, direction,
parameter) seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dplightning.errors import DPLightningError

Perturbation = Literal["swap", "inplace"]

DEFAULT_CHUNK = 1 << 20  # elements of z drawn at once (4 MB in float32)
_MASK64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------------------ seeds
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def direction_seed(seed: int, step: int, direction: int) -> int:
    """Seed of direction ``direction`` at optimizer step ``step``: a pure function of its arguments (counter-based),
    so a resumed run regenerates the same directions. 63 bits."""
    digest = hashlib.sha256(f"dplightning-dpzo:{seed}:{step}:{direction}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def parameter_seed(direction: int, index: int) -> int:
    """Seed of the slice of a direction that lies on trainable parameter number ``index``. 63 bits."""
    return _splitmix64(direction ^ _splitmix64(index + 1)) >> 1


# ------------------------------------------------------------------------------------------ estimator
class ZerothOrderEstimator:
    """Two-point (SPSA) directional derivatives over a fixed list of parameters; ``z`` regenerated from seeds.

    Args:
        root: module whose forward computes the loss (hooks are installed on its submodules in swap mode).
        params: ``(name, parameter)`` pairs to perturb, in a fixed order (the order is part of the direction).
        mu: perturbation scale μ.
        perturbation: ``"swap"`` (θ never written, exact) or ``"inplace"`` (MeZO, rounding drift).
        chunk_size: elements of ``z`` drawn at once.
    """

    def __init__(
        self,
        root: nn.Module,
        params: Sequence[tuple[str, nn.Parameter]],
        mu: float,
        perturbation: Perturbation = "swap",
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        if perturbation not in ("swap", "inplace"):
            raise DPLightningError(f"unknown perturbation '{perturbation}'; use swap or inplace")
        if mu <= 0:
            raise DPLightningError(f"mu must be > 0, got {mu}")
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        for name, p in params:
            if not p.is_contiguous():
                raise DPLightningError(
                    f"parameter '{name}' is not contiguous; call .contiguous() on it before training"
                )
        self.mu = float(mu)
        self.perturbation: Perturbation = perturbation
        self.chunk_size = int(chunk_size)
        self._active: tuple[int, float] | None = (
            None  # (direction seed, scale) while a perturbed forward runs
        )
        self._touched: set[int] = set()
        self._warned_untouched = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if perturbation == "swap":
            self._install_hooks(root)

    @property
    def numel(self) -> int:
        """Dimension ``d`` of the directions."""
        return sum(p.numel() for p in self.params)

    # ------------------------------------------------------------------------------------ directions
    def chunks(self, index: int, seed: int) -> Iterator[tuple[slice, Tensor]]:
        """``(slice of the flattened parameter, z chunk)`` pairs of parameter ``index`` under direction ``seed``.
        Each chunk is ``[min(chunk_size, remaining)]`` standard normals in the parameter's dtype and device."""
        p = self.params[index]
        gen = torch.Generator(device=p.device)
        gen.manual_seed(parameter_seed(seed, index))
        n = p.numel()
        for start in range(0, n, self.chunk_size):
            size = min(self.chunk_size, n - start)
            yield slice(start, start + size), torch.randn(size, generator=gen, device=p.device, dtype=p.dtype)

    def direction(self, seed: int) -> list[Tensor]:
        """The whole direction ``z`` as one tensor per parameter (shapes of ``params``). Diagnostics/tests only:
        training never materialises it."""
        out = []
        for i, p in enumerate(self.params):
            z = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
            for sl, chunk in self.chunks(i, seed):
                z[sl] = chunk
            out.append(z.view_as(p))
        return out

    @torch.no_grad()
    def add_direction(self, seed: int, alpha: float) -> None:
        """``θ += alpha · z(seed)`` in place, chunk by chunk."""
        for i, p in enumerate(self.params):
            flat = p.detach().view(-1)
            for sl, chunk in self.chunks(i, seed):
                flat[sl].add_(chunk, alpha=alpha)

    def perturbed_tensor(self, index: int, seed: int, scale: float) -> Tensor:
        """A new tensor ``θ_index + scale · z_index(seed)`` (shape of the parameter); θ is not touched."""
        p = self.params[index].detach()
        out = torch.empty_like(p)
        flat_out, flat_p = out.view(-1), p.view(-1)
        for sl, chunk in self.chunks(index, seed):
            torch.add(flat_p[sl], chunk, alpha=scale, out=flat_out[sl])
        return out

    # ------------------------------------------------------------------------------------ swap hooks
    def _install_hooks(self, root: nn.Module) -> None:
        index = {id(p): i for i, p in enumerate(self.params)}
        owners: dict[nn.Module, list[tuple[str, int]]] = {}
        for module in root.modules():
            for pname, p in module._parameters.items():  # direct params, tied ones appear in every owner
                if p is not None and id(p) in index:
                    owners.setdefault(module, []).append((pname, index[id(p)]))
        self._owners = owners

        def pre_hook(module: nn.Module, args: Any) -> None:
            if self._active is None:
                return
            seed, scale = self._active
            for pname, i in owners[module]:
                module._parameters[pname] = self.perturbed_tensor(i, seed, scale)  # type: ignore[assignment]
                self._touched.add(i)

        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            for pname, i in owners[module]:
                module._parameters[pname] = self.params[i]

        for module in owners:
            self._handles.append(module.register_forward_pre_hook(pre_hook))
            self._handles.append(module.register_forward_hook(post_hook, always_call=True))

    def _restore_all(self) -> None:
        for module, entries in getattr(self, "_owners", {}).items():
            for pname, i in entries:
                module._parameters[pname] = self.params[i]

    def remove(self) -> None:
        """Remove the swap hooks."""
        self._restore_all()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------------------------- estimates
    @contextlib.contextmanager
    def perturbed(self, seed: int, scale: float) -> Iterator[None]:
        """Forwards run inside see ``θ + scale · z(seed)`` (swap mode only: nothing is written to θ)."""
        if self.perturbation != "swap":
            raise DPLightningError("perturbed() needs perturbation='swap'; use directional_derivatives()")
        self._active = (seed, scale)
        self._touched.clear()
        try:
            yield
        finally:
            self._active = None
            self._restore_all()
        missing = set(range(len(self.params))) - self._touched
        if missing and not self._warned_untouched:
            self._warned_untouched = True
            names = [self.names[i] for i in sorted(missing)][:3]
            warnings.warn(
                f"DP-ZO: {len(missing)} trainable parameters (e.g. {names}) were not perturbed because their module's "
                "forward did not run; if they are used outside it, set perturbation='inplace'",
                stacklevel=3,
            )

    @torch.no_grad()
    def directional_derivatives(self, loss_fn: Callable[[], Tensor], seed: int) -> tuple[Tensor, Tensor]:
        """Per-example central differences along ``z(seed)``.

        Args:
            loss_fn: returns the per-example losses ``[B]`` at the current (perturbed) parameters.
            seed: direction seed.

        Returns:
            ``((L⁺ − L⁻) / (2μ), (L⁺ + L⁻) / 2)``, both ``[B]`` float64 (the second approximates the loss at θ
            up to O(μ²)). θ is unchanged afterwards (bit-exact in swap mode).
        """
        mu = self.mu
        if self.perturbation == "swap":
            with self.perturbed(seed, mu):
                plus = loss_fn().detach().double()
            with self.perturbed(seed, -mu):
                minus = loss_fn().detach().double()
        else:
            applied = mu  # net multiple of z currently added to θ
            self.add_direction(seed, mu)
            try:
                plus = loss_fn().detach().double()
                self.add_direction(seed, -2.0 * mu)
                applied = -mu
                minus = loss_fn().detach().double()
            finally:
                self.add_direction(seed, -applied)
        return (plus - minus) / (2.0 * mu), (plus + minus) / 2.0
