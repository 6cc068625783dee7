"""DP-SGD as a Lightning ``Strategy``: Poisson batches, per-example clipping by groups, Gaussian noise.

One logical step::

    Poisson batch (rate q, may be empty) -> training_step (mean of per-example losses)
      -> backward; hooks give per-example grads of trainable params [B, *shape]
      -> clip per group g to C_g, sum over examples (accumulated over micro-batches)
      -> + N(0, (sigma_g C_g)^2) per group, once per logical step
      -> / expected batch size qN  -> optimizer.step -> accountant.step(sigma_eff, q)

``sigma_eff = (sum_g sigma_g^-2)^(-1/2)`` is what the step costs: the group releases together form one Gaussian
mechanism of that multiplier. By default every group gets the same absolute noise std ``sigma * C_total`` with
``C_total = sqrt(sum_g C_g^2)``, so ``sigma_eff = sigma``.

:class:`DPSGDMixin` is the DP-SGD release on top of :class:`~dplightning.strategies.base.PrivateStrategyMixin`;
:class:`DPSGDStrategy` runs it on one device, :class:`~dplightning.strategies.ddp_dpsgd.DDPDPSGDStrategy` across
processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from dplightning.checkpoint_io import AtomicCheckpointIO
from dplightning.errors import DPLightningError
from dplightning.privacy.accounting import AccountantKind, StepEvent
from dplightning.privacy.clipping import (
    CLIPPING_MODES,
    ClippingMode,
    clip_to_grid_and_sum,
    group_grids,
    make_groups,
)
from dplightning.privacy.discretization import from_grid
from dplightning.privacy.mechanisms import LMOMechanism
from dplightning.privacy.per_example_grads import LossReduction, PerExampleGradients
from dplightning.strategies.base import (
    PrivateStrategyMixin,
    resolve_device,
)
from dplightning.strategies.batches import batch_size_of
from dplightning.strategies.settings import PrivacySettings

GradientNoise = Literal["gaussian", "lmo"]


# The exact noise sampler costs a fixed amount per call (masks, rejection rounds), so small tensors (LoRA's
# A and B) are released together, one draw per run of tensors holding at least this many coordinates; a bound
# keeps the extra copies (int64 sums, noise, float64 release) small when a group holds whole weight matrices.
NOISE_BATCH_ELEMENTS = 1 << 20


class _ValueFree(torch.autograd.Function):
    """Zero in the forward pass, the identity in the backward pass: a loss whose gradient is the given loss's
    (bit for bit) and whose value says nothing."""

    @staticmethod
    def forward(ctx: Any, loss: Tensor) -> Tensor:
        return torch.zeros_like(loss)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def _noise_batches(names: list[str], sums: Mapping[str, Tensor], min_elements: int) -> list[list[str]]:
    """``names`` cut into consecutive runs of at least ``min_elements`` coordinates (the last may hold fewer)."""
    batches: list[list[str]] = [[]]
    size = 0
    for name in names:
        if size >= min_elements:
            batches.append([])
            size = 0
        batches[-1].append(name)
        size += sums[name].numel()
    return [b for b in batches if b]


def check_dpsgd_settings(
    settings: PrivacySettings, *, max_grad_norm: float, clipping: str, noise: str, lmo: Any
) -> None:
    """Every check of a DP-SGD configuration, in order: clipping mode, noise mechanism (LMO noise is sound
    only with per-example L1 clipping and RDP accounting), the shared privacy settings, the clip norm."""
    accountant = settings.accountant
    if clipping not in CLIPPING_MODES:
        raise DPLightningError(
            f"unknown clipping '{clipping}'; use one of flat, per_layer, per_adapter, flat_l1"
        )
    if noise not in ("gaussian", "lmo"):
        raise DPLightningError(f"unknown noise '{noise}'; use gaussian or lmo")
    if noise == "lmo":
        if lmo is None:
            raise DPLightningError(
                "noise='lmo' needs lmo=LMOMechanism(...) or its parameter dict (see lmo-search)"
            )
        if clipping != "flat_l1":
            raise DPLightningError(
                "noise='lmo' needs clipping='flat_l1' (its vector accounting is for L1 clipping)"
            )
        if accountant != "rdp":
            raise DPLightningError(
                "noise='lmo' on gradients is accounted with RDP (its convexity check is for RDP); set accountant='rdp'"
            )
    elif clipping == "flat_l1":
        raise DPLightningError(
            "clipping='flat_l1' bounds the L1 norm, which Gaussian accounting ignores; set noise='lmo'"
        )
    elif lmo is not None:
        raise DPLightningError("lmo= is only used with noise='lmo'; drop it or set noise='lmo'")
    settings.validate("DPSGDStrategy")
    if not 0 < max_grad_norm < math.inf:
        raise DPLightningError(f"max_grad_norm must be > 0, got {max_grad_norm}")


class DPSGDMixin(PrivateStrategyMixin):
    """Differentially private SGD for any optimizer, as a drop-in Lightning strategy (shared by the
    single-device and the DDP strategy; mixed in before the Lightning strategy class).

    Args:
        noise_multiplier: effective Gaussian noise multiplier σ (noise std / L2 sensitivity). ``None`` calibrates
            it from ``target_epsilon`` and the planned steps. ``0`` disables noise (clipping only, ε = ∞).
        max_grad_norm: total per-example L2 sensitivity ``C``; per-layer / per-adapter modes split it evenly,
            ``C_g = C / sqrt(#groups)``, so the whole clipped gradient still has norm ≤ C.
        clipping: ``"flat"`` (one group), ``"per_layer"`` (each parameter tensor), ``"per_adapter"`` (each LoRA
            adapter's A and B jointly).
            ``"flat_l1"``: one group clipped in L1 norm to ``max_grad_norm``; only with ``noise="lmo"``.
        target_epsilon: ε budget; training never takes a step that would exceed it.
        target_delta: δ of the guarantee.
        accountant: ``"pld"`` (tight, default) or ``"rdp"``.
        poisson_sampling: replace the training sampler by Poisson sampling with ``q = batch_size·accumulate / N``
            (what the accounting assumes). ``False`` keeps shuffled fixed-size batches, which the reported ε
            does not cover (it is computed for Poisson sampling; a warning says so).
        secure_rng: draw noise and batches from the OS CSPRNG (not reproducible; a resumed secure run stays
            secure). ``None`` (default): yes unless a ``seed`` is given. With a seed, noise and batches follow
            it, reproducibly, and the guarantee assumes the seed is secret: a warning says so once per process
            (``False`` without a seed is refused).
        seed: seed of the noise generator and the Poisson sampler (reproducible runs); ``None`` (default): none.
        loss_reduction: how ``training_step``'s loss reduces per-example losses (``"mean"`` or ``"sum"``).
        device: ``"auto"`` (CUDA if available, else CPU) or an explicit device.
        noise: ``"gaussian"`` or ``"lmo"`` (i.i.d. LMO noise ``σ·C·n`` per coordinate, n ~ ``lmo``, with
            ``clipping="flat_l1"`` and ``accountant="rdp"``; σ is then the LMO multiplier, see
            :mod:`dplightning.privacy.lmo_accounting`).
        lmo: the :class:`~dplightning.privacy.mechanisms.LMOMechanism` (or its parameter dict) for ``noise="lmo"``.
    """

    # A resumed run's plan may overspend at the current σ when a controller moved it; the controller's own
    # guard and the per-step guard keep ε within budget, so only a fresh plan that overspends is refused.
    _refuse_overspending_resume = False

    def _init_dpsgd(
        self,
        settings: PrivacySettings,
        *,
        max_grad_norm: float,
        clipping: ClippingMode,
        loss_reduction: LossReduction,
        noise: GradientNoise = "gaussian",
        lmo: LMOMechanism | Mapping[str, Any] | None = None,
    ) -> None:
        """Check the configuration and set the DP-SGD state (after the Lightning strategy's ``__init__``)."""
        check_dpsgd_settings(settings, max_grad_norm=max_grad_norm, clipping=clipping, noise=noise, lmo=lmo)
        self._init_private(settings)
        self.noise = noise
        self.lmo = None if lmo is None else LMOMechanism.coerce(lmo)
        self.max_grad_norm = float(max_grad_norm)
        self.clipping: ClippingMode = clipping
        self.loss_reduction: LossReduction = loss_reduction
        # AutomaticClipping sets γ > 0: per-example C_g/(‖g‖+γ) normalisation replaces min(1, C_g/‖g‖) clipping.
        self.normalization_stability: float | None = None
        self.last_noisy_grad_norms: dict[str, float] = {}  # per group, of the released (noisy) sum: public
        # per group, per-example pre-clip norms of the last step [B]: PRIVATE, only for mechanisms that noise them
        self.private_step_norms: dict[str, Tensor] = {}
        self._engine: PerExampleGradients | None = None
        self._micro_batch_size = 0  # examples of the (micro-)batch being backpropagated
        self._summed: dict[str, Tensor] = {}
        self._last_norms: dict[str, list[Tensor]] = {}

    # ------------------------------------------------------------------------------------ mechanism
    @override
    def step_event(self, sigma: float, q: float) -> StepEvent:
        if self.noise != "lmo":
            return StepEvent(sigma, q)
        if self.auxiliary_noise_multipliers:
            raise DPLightningError(
                "auxiliary Gaussian releases cannot be combined with LMO noise; use noise='gaussian'"
            )
        return StepEvent(sigma, q, "lmo", self.lmo, "vector")

    # ------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        module = self._attached_module
        self._check_optimization(
            trainer,
            module,
            clip_conflict="conflicts with DP clipping; remove it and set max_grad_norm",
            one_optimizer="DPSGDStrategy supports exactly one optimizer",
        )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            # The scaler multiplies the loss before backward and divides the gradients after the release: the
            # clipping would see gradients ×scale, and the noisy update would come out shrunk by the scale.
            raise DPLightningError(
                "precision 16-mixed scales the loss with a GradScaler, which per-example clipping cannot follow; "
                "use precision bf16-mixed or 32-true"
            )
        if self._engine is not None:
            self._engine.remove()
        # backward() seeds every example's loss with exactly 1, so the hooks read per-example gradients unscaled
        self._engine = PerExampleGradients(module, "sum")
        self._params = dict(module.named_parameters())
        self._trainable = set(self._engine.param_names)
        self._sync_initial_params()
        if not self.groups:
            self.groups = make_groups(self._engine.param_names, self.clipping)
            per_group = self.max_grad_norm / math.sqrt(len(self.groups))
            self.clip_thresholds = dict.fromkeys(self.groups, per_group)
            if self.noise_multiplier is not None:
                self.set_noise_multiplier(self.noise_multiplier)
        self._finish_setup()

    # ------------------------------------------------------------------------------------- one step
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        size = batch_size_of(batch)
        if size == 0:
            # An empty Poisson batch is still a step: the release is pure noise. Skip the model entirely.
            return torch.zeros((), device=self.root_device, requires_grad=True)
        if size is None:
            raise DPLightningError(
                "the training batch holds no tensor with a batch dimension; DP-SGD needs one per-example row each"
            )
        self._micro_batch_size = size
        if self._engine is not None:
            # Every hooked layer must see exactly this many examples in its leading dimension; a layer fed
            # flattened tokens would otherwise be clipped per token.
            self._engine.expected_batch_size = size
        output = super().training_step(*args, **kwargs)
        if output is None:
            # Lightning would skip this micro-batch's backward. A skip decided by the records (a NaN guard, a
            # filter) is itself a release nothing accounts for, and the window would be released short.
            raise DPLightningError(
                "training_step returned None, which makes Lightning skip the batch; a private run trains every "
                "Poisson batch: return the loss for every batch (non-finite examples are already dropped safely)"
            )
        # Lightning hands the returned loss to every callback (on_train_batch_end's outputs): it is the raw loss of
        # the private batch, so only its gradient goes on; its value is zero.
        if isinstance(output, Tensor):
            return _ValueFree.apply(output)
        if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
            return {**output, "loss": _ValueFree.apply(output["loss"])}
        return output

    @override
    def backward(
        self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any
    ) -> Tensor:
        # Seed every example's loss with exactly 1, whatever the batch. Backpropagating the mean's 1/B ran the
        # whole backward pass at a scale set by how many examples the Poisson draw took, so when one record came
        # or went the *other* examples' gradients moved in their low bits (by a few % of C in bf16, ~1e-6 in
        # fp32): a sensitivity above C. Multiplying by B·k is exact, and so are Lightning's /k and the mean's /B.
        self._check_accumulation()
        self._enter_micro_batch()
        k = self._attached_module.trainer.accumulate_grad_batches
        seed = self._micro_batch_size * k if self.loss_reduction == "mean" else k
        super().backward(closure_loss * float(seed), optimizer, *args, **kwargs)
        assert self._engine is not None
        self._add_clipped(self._engine.pop())
        return closure_loss

    def _add_clipped(self, grads: Mapping[str, Tensor]) -> None:
        """Clip one (micro-)batch's per-example gradients onto the grid and add them to the step's sums; keep
        their pre-clip norms (private) for the step."""
        if not grads:
            return
        summed, norms = clip_to_grid_and_sum(
            grads,
            self.groups,
            self.clip_thresholds,
            self.grids(),
            p=self._norm_order,
            stability=self.normalization_stability,
        )
        for name, value in summed.items():
            prev = self._summed.get(name)
            self._summed[name] = value if prev is None else prev + value
        for group, value in norms.items():
            self._last_norms.setdefault(group, []).append(value.detach())

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        def private_closure() -> Any:
            result = closure()
            self._check_window_complete()
            self.release_noisy_gradient()
            return result

        result = super().optimizer_step(optimizer, private_closure, model, **kwargs)
        self._release_unapplied = False
        return result

    @property
    def _norm_order(self) -> float:
        return 1.0 if self.clipping == "flat_l1" else 2.0

    def grids(self) -> dict[str, float]:
        """Grid ``γ_g`` of each group at the current thresholds: clipped sums and releases are integers times it
        (:mod:`dplightning.privacy.discretization`)."""
        sizes = {n: self._params[n].numel() for names in self.groups.values() for n in names}
        return group_grids(self.groups, sizes, self.clip_thresholds, self._norm_order)

    def release_noisy_gradient(self) -> None:
        """Turn the accumulated clipped sums into ``p.grad = (sum + noise) / (qN)`` and charge the accountant."""
        assert self.sample_rate is not None and self.expected_batch_size is not None
        sigma_eff, q = self.effective_noise_multiplier, self.sample_rate
        if not self.within_budget(sigma_eff, q):
            # Nothing is released: drop the clipped sums, skip the update, stop training cleanly.
            for p in self._params.values():
                p.grad = None
            self._summed.clear()
            self._last_norms.clear()
            self.private_step_norms = {}
            self._stop_on_budget()
            return
        sums = {
            name: self._summed.get(name, torch.zeros(p.shape, dtype=torch.int64, device=p.device))
            for name, p in self._params.items()
            if name in self._trainable
        }
        sums = self._reduce_sums(sums)
        for group, grid in self.grids().items():
            names = self.groups[group]
            # Noise std in grid units: σ_g · (sensitivity C_g/γ_g). The release is the integer sum + noise.
            std = self.noise_multipliers.get(group, 0.0) * self.clip_thresholds[group] / grid
            squared_norm = 0.0
            for batch in _noise_batches(names, sums, NOISE_BATCH_ELEMENTS):
                units = torch.cat([sums[name].reshape(-1) for name in batch])
                released = self._add_noise(units, std) if std > 0 else units.double()
                for name, part in zip(
                    batch, released.split([sums[name].numel() for name in batch]), strict=True
                ):
                    p = self._params[name]
                    grad = (from_grid(part.view(sums[name].shape), grid) / self.expected_batch_size).to(
                        p.dtype
                    )
                    p.grad = grad
                    squared_norm += float(grad.pow(2).sum())
            self.last_noisy_grad_norms[group] = math.sqrt(squared_norm)
        self._summed.clear()
        # Keep this step's per-example norms (PRIVATE: only for mechanisms that privatise them) and start afresh.
        self.private_step_norms = {g: torch.cat(v) for g, v in self._last_norms.items()}
        self._last_norms.clear()
        self._record_step(sigma_eff, q)

    # Hooks the DDP variant overrides: single-device versions are identities.
    def _sync_initial_params(self) -> None:
        """Make every rank start from the same weights (DDP broadcasts from rank 0)."""

    def _reduce_sums(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum the clipped per-example gradient sums over ranks."""
        return sums

    def _add_noise(self, units: Tensor, std: float) -> Tensor:
        """The release of one tensor: ``units + noise`` in grid units, added exactly and only then turned into
        float64 (the same on every rank, so noise enters once in total). LMO noise (i.i.d., factor σ·C/γ) can
        exceed int64 when its mixing variable is tiny: that sum is formed in Python integers."""
        if self.noise == "lmo":
            assert self.lmo is not None
            return self.noise_source.add_discrete_lmo(units.cpu(), self.lmo, std).to(units.device)
        noise = self.noise_source.discrete_gaussian(units.shape, std).to(units.device)
        return (units + noise).double()

    @override
    def _discard_unreleased(self) -> None:
        self._summed.clear()
        self._last_norms.clear()
        self.private_step_norms = {}

    @override
    def teardown(self) -> None:
        self._discard_unreleased()
        if self._engine is not None:
            self._engine.remove()
            self._engine = None
        super().teardown()


class DPSGDStrategy(DPSGDMixin, SingleDeviceStrategy):
    __doc__ = DPSGDMixin.__doc__

    def __init__(
        self,
        *,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        clipping: ClippingMode = "flat",
        target_epsilon: float | None = None,
        target_delta: float = 1e-5,
        accountant: AccountantKind = "pld",
        poisson_sampling: bool = True,
        secure_rng: bool | None = None,
        seed: int | None = None,
        loss_reduction: LossReduction = "mean",
        device: str | torch.device = "auto",
        checkpoint_io: CheckpointIO | None = None,
        noise: GradientNoise = "gaussian",
        lmo: LMOMechanism | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(device=resolve_device(device), checkpoint_io=checkpoint_io or AtomicCheckpointIO())
        self._init_dpsgd(
            PrivacySettings.from_arguments(locals()),
            max_grad_norm=max_grad_norm,
            clipping=clipping,
            loss_reduction=loss_reduction,
            noise=noise,
            lmo=lmo,
        )


def __getattr__(name: str) -> Any:
    # DDPDPSGDStrategy has its own module, which imports this one; it is importable from here as before.
    if name == "DDPDPSGDStrategy":
        from dplightning.strategies.ddp_dpsgd import DDPDPSGDStrategy

        return DDPDPSGDStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DPSGDMixin",
    "DPSGDStrategy",
    "check_dpsgd_settings",
]
