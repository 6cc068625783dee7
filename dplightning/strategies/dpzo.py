"""DP-ZO (Tang et al., arXiv:2401.04343) as a Lightning ``Strategy``: zeroth-order SPSA steps whose only
data-dependent quantity, one scalar per random direction, is clipped per example and privatised.

One logical step, with ``n = num_directions`` directions and Poisson batch ``B`` (may be empty)::

    for k in 1..n:  s_k = H(seed, step, k);  z_k ~ N(0, I) over the trainable params, regenerated from s_k
        L⁺_i = loss_i(θ + μ z_k),  L⁻_i = loss_i(θ − μ z_k)               (forwards only, under no_grad)
        d_ik = clip((L⁺_i − L⁻_i) / (2μ), −C, C)                            [B]
        S_k  = Σ_i d_ik                                                     (summed over micro-batches)
    Ŝ = S + noise                                                           [n], one release per step
    g = Ŝ / (q N)                                                           [n]
    θ ← θ − lr · (1/n) Σ_k g_k z_k                                          (z_k regenerated again)

Privacy of one step. Every example moves the released vector ``S ∈ R^n`` by at most ``C`` per coordinate,
so its L2 sensitivity is ``C √n`` and its L1 sensitivity is ``n C``. ``noise_multiplier`` is the multiplier
of the whole step (noise scale / sensitivity of the vector), so the accountant is charged exactly one
Poisson-subsampled event per step, whatever ``n`` is (the n directions share one batch: charging n
independently-subsampled compositions would under-count):

- Gaussian: per-coordinate std ``σ C √n``; the accountant records ``StepEvent(σ, q, "gaussian")``.
- LMO: per-coordinate noise ``s n C · n_LMO`` (n_LMO ~ ``lmo``, i.i.d.); ``n = 1``: a scalar release
  accounted by PLD (``StepEvent(s, q, "lmo", lmo, "scalar")``); ``n > 1``: a vector of L1 sensitivity ``n C``,
  accounted by RDP after the convexity check (``accountant="rdp"``, release ``"vector"``).
- Laplace:  per-coordinate scale ``λ n C``; with ``target_delta > 0`` the PLD accountant records
  ``StepEvent(λ, q, "laplace")`` (only ``n = 1``: the PLD of a vector Laplace is only claimed for one
  coordinate); with ``target_delta = 0`` each step is ``1/λ``-DP, amplified by Poisson sampling to
  ``log(1 + q (e^{1/λ} − 1))`` and composed additively (:class:`PureLaplaceAccountant`), for any ``n``.

Perturbation (``perturbation=``):

- ``"swap"`` (default): θ is never written during the two forwards. Forward pre-hooks on every module that
  owns a trainable parameter swap in a temporary ``θ_p ± μ z_p`` (one parameter-sized tensor per module call)
  and forward hooks put the original ``Parameter`` back, so θ is restored bit-exactly by construction.
  Requires trainable parameters to be read inside their owning module's ``forward`` (true for Hugging Face /
  peft models); a parameter whose module never ran is reported once with a warning.
- ``"inplace"``: MeZO's ``θ += μz; θ −= 2μz; θ += μz`` on the parameter storage in 1 M-element chunks. Works
  for any module, but floating-point rounding leaves a drift of a few ulps of ``μ|z|`` per step.

In both modes ``z`` is never stored whole: it is regenerated chunk by chunk from a per-(step, direction,
parameter) seed, so peak memory is one forward's plus one parameter-sized buffer (swap) or 4 MB (inplace).
There is no optimizer state: the learning rate is read from the optimizer's first param group (so LR
schedulers work) and ``optimizer.step`` is never called.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from dplightning.checkpoint_io import AtomicCheckpointIO
from dplightning.errors import DPLightningError
from dplightning.privacy.accounting import (
    AccountantKind,
    Mechanism,
    PureLaplaceAccountant,
    StepEvent,
)
from dplightning.privacy.accounting import laplace_scale_for_pure_epsilon as pure_laplace_multiplier
from dplightning.privacy.discretization import from_grid, scalar_grid, to_grid
from dplightning.privacy.mechanisms import LMOMechanism
from dplightning.privacy.per_example_grads import reject_example_mixing
from dplightning.privacy.zeroth_order import (
    Perturbation,
    ZerothOrderEstimator,
    direction_seed,
    parameter_seed,
)
from dplightning.strategies.base import PrivateStrategyMixin, resolve_device
from dplightning.strategies.batches import batch_size_of
from dplightning.strategies.settings import PrivacySettings

NoiseKind = Literal["gaussian", "laplace", "lmo"]
Trainable = Literal["lora", "all"]

SCALAR_GROUP = "scalar"


# ----------------------------------------------------------------------------------------- strategy
def _check_lmo_release(noise: str, lmo: Any, pure_dp: bool, num_directions: int, accountant: str) -> None:
    """LMO noise needs its mechanism, δ > 0, and RDP for a vector of directions; ``lmo=`` needs LMO noise."""
    if noise != "lmo":
        if lmo is not None:
            raise DPLightningError("lmo= is only used with noise='lmo'; drop it or set noise='lmo'")
        return
    if lmo is None:
        raise DPLightningError(
            "noise='lmo' needs lmo=LMOMechanism(...) or its parameter dict (see lmo-search)"
        )
    if pure_dp:
        raise DPLightningError("LMO noise is accounted for δ > 0; set target_delta > 0")
    if num_directions > 1 and accountant != "rdp":
        raise DPLightningError(
            "LMO noise on n > 1 directions is an L1 vector release, accounted with RDP; set accountant='rdp'"
        )


def check_dpzo_settings(
    settings: PrivacySettings,
    *,
    noise: str,
    noise_kinds: Sequence[str],
    lmo: Any,
    pure_dp: bool,
    num_directions: int,
    trainable: str,
    perturbation: str,
    mu: float,
    max_loss_diff: float,
) -> None:
    """Every check of a DP-ZO configuration, in order: noise mechanism, the shared privacy settings (``settings``
    carries the accounting δ: a placeholder when ``pure_dp``), the estimator, then which accounting can describe
    the release (pure ε only for Laplace; Laplace with δ > 0 only through PLD and for one direction)."""
    accountant = settings.accountant
    if noise not in noise_kinds:
        raise DPLightningError(f"unknown noise '{noise}'; use one of {', '.join(noise_kinds)}")
    _check_lmo_release(noise, lmo, pure_dp, num_directions, accountant)
    settings.validate("DPZOStrategy")
    if num_directions < 1:
        raise DPLightningError(f"num_directions must be >= 1, got {num_directions}")
    if trainable not in ("lora", "all"):
        raise DPLightningError(f"unknown trainable '{trainable}'; use lora or all")
    if perturbation not in ("swap", "inplace"):
        raise DPLightningError(f"unknown perturbation '{perturbation}'; use swap or inplace")
    if not 0 < mu < math.inf:
        raise DPLightningError(f"mu must be > 0, got {mu}")
    if not 0 < max_loss_diff < math.inf:
        raise DPLightningError(f"max_loss_diff must be > 0, got {max_loss_diff}")
    if pure_dp and noise != "laplace":
        raise DPLightningError("target_delta=0 (pure ε-DP) needs noise='laplace'; Gaussian noise needs δ > 0")
    if noise == "laplace" and not pure_dp:
        if accountant != "pld":
            raise DPLightningError(
                "Laplace noise with δ > 0 needs accountant='pld' (RDP has no subsampled Laplace)"
            )
        if num_directions > 1:
            raise DPLightningError(
                "Laplace noise with δ > 0 supports num_directions=1 only; set target_delta=0 (pure ε-DP) for n > 1"
            )


def _loss_shape_error(shape: tuple[int, ...], size: int) -> DPLightningError:
    return DPLightningError(
        f"per_example_loss returned shape {shape} for a batch of {size} examples; DP-ZO clips one loss per "
        "example: return a [B] tensor (reduce over tokens inside each example)"
    )


class DPZOStrategy(PrivateStrategyMixin, SingleDeviceStrategy):
    """Differentially private zeroth-order fine-tuning (DP-ZO): two forwards per direction, no backward, no
    optimizer state; only a clipped, noised scalar per direction depends on the data.

    Shares the Poisson batches, σ calibration, budget guard and checkpoint state of every private strategy
    (:class:`~dplightning.strategies.base.PrivateStrategyMixin`); there are no per-example gradients. The module
    must define ``per_example_loss(batch) -> [B]``; its ``training_step`` is not called (the strategy logs
    ``train/loss`` = mean of (L⁺ + L⁻)/2 itself, only if the module has ``log_private_loss = True``: it is
    computed from the private batch and not covered by ε).

    Args:
        mu: perturbation scale μ (MeZO: 1e-3 full, 1e-2 LoRA).
        max_loss_diff: clip threshold C of each per-example scalar ``(L⁺ − L⁻)/(2μ)``.
        noise: ``"gaussian"`` ((ε, δ)-DP), ``"laplace"`` (pure ε-DP with ``target_delta=0``, else PLD) or ``"lmo"``
            (Laplace scale mixture ``lmo``; PLD for one direction, RDP for several).
        lmo: the :class:`~dplightning.privacy.mechanisms.LMOMechanism` (or its parameter dict, e.g. from
            ``dplightning privacy lmo-search``) for ``noise="lmo"``.
        noise_multiplier: noise scale / sensitivity of one step's release (see module docstring); ``None``
            calibrates it from ``target_epsilon``; ``0`` disables noise (ε = ∞).
        target_epsilon: ε budget; training never takes a step that would exceed it.
        target_delta: δ; ``0`` (Laplace only) selects pure ε-DP accounting.
        num_directions: n ≥ 1 directions per step, averaged; one privatised release of n scalars.
        trainable: ``"lora"`` (the module's ``requires_grad`` parameters, LoRA for ``DPLoRAModule``) or
            ``"all"`` (every parameter; they are marked ``requires_grad`` so checkpoints hold them).
        perturbation: ``"swap"`` (exact restore, default) or ``"inplace"`` (MeZO, any module).
        eval_forwards: run the perturbed forwards in eval mode (no dropout), as MeZO does: both sides of the
            difference must see the same function.
        accountant: ``"pld"`` or ``"rdp"`` (Gaussian only); ignored for pure ε-DP.
        poisson_sampling, secure_rng, seed, device, checkpoint_io: as for
            :class:`~dplightning.strategies.dpsgd.DPSGDStrategy`: ``seed`` (secret) seeds the noise and the
            batches only.
        direction_seed: public seed of the random directions (they do not depend on the data, so they, and
            this seed, may be published). Kept apart from ``seed``: directions derived from the secret seed
            would let anyone test a guessed seed exactly against two released weight sets, then replay its
            noise.
    """

    # The step's multiplier is σ (Gaussian), λ (Laplace) or s (LMO): the budget refusal names none of them.
    _calibrated_name = "it"

    def __init__(
        self,
        *,
        mu: float = 1e-3,
        max_loss_diff: float = 1.0,
        noise: NoiseKind = "gaussian",
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float = 1e-5,
        num_directions: int = 1,
        trainable: Trainable = "lora",
        perturbation: Perturbation = "swap",
        eval_forwards: bool = True,
        accountant: AccountantKind = "pld",
        poisson_sampling: bool = True,
        secure_rng: bool | None = None,
        seed: int | None = None,
        direction_seed: int = 0,
        device: str | torch.device = "auto",
        checkpoint_io: CheckpointIO | None = None,
        lmo: LMOMechanism | Mapping[str, Any] | None = None,
    ) -> None:
        pure = target_delta == 0
        # δ = 0 selects pure ε accounting below; the (ε, δ) checks and accountant see a placeholder δ.
        settings = PrivacySettings.from_arguments(locals(), target_delta=1e-5 if pure else target_delta)
        check_dpzo_settings(
            settings,
            noise=noise,
            noise_kinds=self.noise_kinds(),
            lmo=lmo,
            pure_dp=pure,
            num_directions=num_directions,
            trainable=trainable,
            perturbation=perturbation,
            mu=mu,
            max_loss_diff=max_loss_diff,
        )
        super().__init__(device=resolve_device(device), checkpoint_io=checkpoint_io or AtomicCheckpointIO())
        self._init_private(settings)
        self.target_delta = float(target_delta)
        self.pure_dp = pure
        if pure:
            self.accountant = PureLaplaceAccountant()  # type: ignore[assignment]
        self.mu = float(mu)
        self.noise = noise
        self.lmo = None if lmo is None else LMOMechanism.coerce(lmo)
        self.num_directions = int(num_directions)
        self.trainable: Trainable = trainable
        self.perturbation: Perturbation = perturbation
        self.eval_forwards = eval_forwards
        self.direction_seed = int(direction_seed)
        # One clipping group: the per-example scalar. Set now so σ, C and checkpoint state work before setup.
        self.groups = {SCALAR_GROUP: []}
        self.clip_thresholds = {SCALAR_GROUP: float(max_loss_diff)}
        if noise_multiplier is not None:
            self.set_noise_multiplier(noise_multiplier)
        self._estimator: ZerothOrderEstimator | None = None
        self._zo_sums: Tensor | None = None  # [n] int64 clipped sums in grid units (private until noised)
        self._loss_shape_checked = False
        self.last_projected_grads: Tensor | None = None  # [n] released g of the last step (public)

    # --------------------------------------------------------------------------------- mechanism hooks
    @staticmethod
    def noise_kinds() -> tuple[str, ...]:
        """Accepted values of ``noise`` (a subclass adding a mechanism extends this)."""
        return ("gaussian", "laplace", "lmo")

    @property
    def mechanism(self) -> Mechanism:
        """Accounting mechanism of one step's release."""
        return self.noise if self.noise in ("laplace", "lmo") else "gaussian"  # type: ignore[return-value]

    @property
    def max_loss_diff(self) -> float:
        """Clip threshold C of the per-example scalar."""
        return self.clip_thresholds[SCALAR_GROUP]

    @property
    @override
    def effective_noise_multiplier(self) -> float:
        """The step's multiplier σ (Gaussian) or λ (Laplace), what the accountant is charged."""
        return float(self.noise_multiplier or 0.0)

    @override
    def step_event(self, sigma: float, q: float) -> StepEvent:
        if self.noise == "lmo":
            return StepEvent(sigma, q, "lmo", self.lmo, "scalar" if self.num_directions == 1 else "vector")
        return StepEvent(sigma, q, self.mechanism)

    def noise_scale(self) -> float:
        """Per-coordinate noise std (Gaussian, ``σ C √n``), Laplace scale (``λ n C``) or LMO factor (``s n C``: the
        noise is that times n_LMO) of one release."""
        sigma, c, n = self.effective_noise_multiplier, self.max_loss_diff, self.num_directions
        return sigma * c * (n if self.noise in ("laplace", "lmo") else math.sqrt(n))

    @property
    def grid(self) -> float:
        """Grid ``γ = C / 2^40`` of the per-example scalars and of every release (see
        :mod:`dplightning.privacy.discretization`): clipped scalars are integers in ``[-2^40, 2^40]``."""
        return scalar_grid(self.max_loss_diff)

    def add_noise(self, units: Tensor) -> Tensor:
        """``units + noise`` for one release of ``[n]`` scalars in grid units, added exactly, as float64: discrete
        Gaussian of std ``σ C √n / γ``, discrete Laplace of scale ``λ n C / γ`` or discrete LMO of factor
        ``s n C / γ`` (Laplace and LMO scales can leave int64: those sums are formed in Python integers). Every
        scalar release goes through here."""
        # The float products above may round a few ulps below the accounted scale; 2^-40 more noise covers that.
        scale = self.noise_scale() / self.grid * (1 + 2.0**-40)
        if scale <= 0:
            return units.double()
        # A few scalars: drawn exactly (unbounded support, exact law), which pure ε needs in the far tails.
        if self.noise == "laplace":
            return self.noise_source.add_exact_laplace(units, scale)
        if self.noise == "lmo":
            assert self.lmo is not None
            return self.noise_source.add_exact_lmo(units, self.lmo, scale)
        return self.noise_source.add_exact_gaussian(units, scale)

    def privatize(self, sums: Tensor) -> Tensor:
        """Release ``sums`` ``[n]`` (clipped per-example scalars summed over the batch) with noise: an int64 tensor
        is taken as grid units (what training accumulates), a float one is first rounded to the grid. Returns
        ``γ · (units + noise)`` in float64: every release is an integer multiple of :attr:`grid`."""
        units = sums.cpu() if sums.dtype == torch.int64 else to_grid(sums.cpu(), self.grid)
        return from_grid(self.add_noise(units), self.grid)

    @override
    def calibrate(self, target_epsilon: float, steps: int) -> float:
        if self.pure_dp:  # pure ε-DP Laplace: the (ε, δ) accountants do not apply
            assert self.sample_rate is not None
            return pure_laplace_multiplier(target_epsilon, self.sample_rate, steps)
        return super().calibrate(target_epsilon, steps)

    # ------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        module = self._attached_module
        if trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test/predict: plain forwards, nothing private to set up
        self._check_optimization(
            trainer,
            module,
            clip_conflict="has no effect on DP-ZO; remove it and set max_loss_diff",
            one_optimizer="DPZOStrategy needs exactly one optimizer (for its learning rate)",
        )
        if not callable(getattr(module, "per_example_loss", None)):
            raise DPLightningError(
                f"{type(module).__name__} has no per_example_loss(batch) -> [B]; DP-ZO clips per-example losses"
            )
        if (
            not self.eval_forwards
        ):  # train-mode forwards would apply batch norm's batch statistics and dropout
            reject_example_mixing(module, alternative=", or keep eval_forwards=True")
        if self.trainable == "all":
            for p in module.parameters():
                p.requires_grad_(True)  # checkpoints keep trainable params; no grads are ever computed
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise DPLightningError(
                "the module has no trainable parameters; use trainable='all' or add LoRA adapters"
            )
        if self._estimator is not None:
            self._estimator.remove()
        self._estimator = ZerothOrderEstimator(module, named, self.mu, self.perturbation)
        self.groups = {SCALAR_GROUP: [n for n, _ in named]}
        self._params = dict(module.named_parameters())
        self._trainable = set(self.groups[SCALAR_GROUP])
        self._finish_setup()
        rank_zero_info(
            f"[dplightning] DP-ZO over {self._estimator.numel:,} parameters ({self.trainable}), "
            f"{self.num_directions} direction(s)/step, μ={self.mu}, C={self.max_loss_diff}, noise={self.noise}"
        )

    # ------------------------------------------------------------------------------------- one step
    def _current_step(self) -> int:
        return int(self._attached_module.trainer.global_step)

    def direction_seeds(self, step: int) -> list[int]:
        """Seeds of the ``num_directions`` directions of optimizer step ``step``."""
        return [direction_seed(self.direction_seed, step, k) for k in range(self.num_directions)]

    @contextlib.contextmanager
    def _forward_mode(self) -> Iterator[None]:
        module = self._attached_module
        if not self.eval_forwards:
            yield
            return
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        """Per-example central differences along each direction on this (micro-)batch, clipped to [−C, C] and
        summed into the step's ``[n]`` accumulator. Returns zero: Lightning passes the value to callbacks."""
        batch = args[0] if args else kwargs["batch"]
        module = self._attached_module
        assert self._estimator is not None
        n = self.num_directions
        c, grid = self.max_loss_diff, self.grid
        sums = torch.zeros(n, dtype=torch.int64)  # grid units: exact integer sums
        size = batch_size_of(batch)
        if size is None:
            raise DPLightningError(
                "the training batch holds no tensor with a batch dimension; DP-ZO needs one per-example row each"
            )
        if size == 0:
            # An empty Poisson batch is still a step: the release is noise only. The model is not run.
            self._accumulate(sums)
            return torch.zeros((), device=self.root_device)
        # setup checked that the module defines it; nn.Module's typing knows only tensors and submodules.
        per_example_loss = cast(Callable[[Any], Tensor], module.per_example_loss)
        if not self._loss_shape_checked:
            self._check_loss_shape(per_example_loss, batch, size)
        center: Tensor | None = None
        # The perturbed forwards run in the parameters' own precision, never under bf16 autocast: the loss
        # differences (L⁺ − L⁻) are far below bf16's resolution on a real model (measured correlation of bf16 and
        # fp32 projected gradients on SmolLM2 at μ = 1e-3: 0.17).
        with torch.no_grad(), self._forward_mode():
            for k, seed in enumerate(self.direction_seeds(self._current_step())):
                diffs, mid = self._estimator.directional_derivatives(lambda: per_example_loss(batch), seed)
                if diffs.dim() > 1 or diffs.numel() != size:  # the first batch's probe refuses these already
                    raise _loss_shape_error(tuple(diffs.shape), size)
                diffs = diffs.reshape(size)  # a [B] loss squeezed to a scalar at B = 1
                # A non-finite difference contributes 0 (NaN) or the clip bound (±inf): bounded either way, and
                # nothing is raised or logged because of it.
                clipped = diffs.nan_to_num(nan=0.0, posinf=c, neginf=-c).clamp(-c, c)  # [B] float64
                sums[k] = to_grid(clipped, grid).sum().cpu()  # |unit| ≤ C/γ = 2^40 per example
                if center is None:
                    center = mid
        self._accumulate(sums)
        assert center is not None
        if getattr(module, "log_private_loss", False):  # not covered by ε: only when the user opts in
            finite = center[torch.isfinite(center)]
            loss = finite.mean().float() if finite.numel() else torch.zeros(())
            module.log("train/loss", loss, prog_bar=True, batch_size=center.numel())
        # Lightning hands the return value to every callback (on_train_batch_end's outputs): not the loss.
        return torch.zeros((), device=self.root_device)

    def _check_loss_shape(self, per_example_loss: Callable[[Any], Tensor], batch: Any, size: int) -> None:
        """Refuse a ``per_example_loss`` that is not one value per example, on a probe that does not depend on the
        batch: its first example twice. Clipping is per entry, so a ``[B, T]`` loss would be clipped per token
        (one example moving the sum by T·C) and a scalar one is the batch's mean (sensitivity 2C); checked on the
        batch itself, a loss squeezed to a scalar would be refused only when a Poisson batch holds one record."""
        pair = apply_to_collection(
            batch, Tensor, lambda t: torch.cat([t[:1], t[:1]]) if t.dim() and t.shape[0] == size else t
        )
        with torch.no_grad(), self._forward_mode():
            shape = tuple(per_example_loss(pair).shape)
        if shape != (2,):
            raise _loss_shape_error(shape, 2)
        self._loss_shape_checked = True

    def _accumulate(self, sums: Tensor) -> None:
        self._check_accumulation()
        self._enter_micro_batch()
        self._zo_sums = sums if self._zo_sums is None else self._zo_sums + sums

    @override
    def backward(
        self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any
    ) -> Tensor:
        """No backward pass in DP-ZO."""
        return closure_loss

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the closure (last micro-batch's training step and Lightning's hooks), then release the noisy
        scalars and apply ``θ −= lr · mean_k g_k z_k``. ``optimizer.step`` is not called (no optimizer state)."""
        model = model or self.lightning_module
        assert isinstance(model, pl.LightningModule)
        result = self.precision_plugin._wrap_closure(model, optimizer, closure)
        self._check_window_complete()
        self.release_and_update(float(optimizer.param_groups[0]["lr"]))
        self._release_unapplied = False
        return result

    @torch.no_grad()
    def release_and_update(self, lr: float) -> None:
        """Privatise the step's clipped sums, charge the accountant, update θ along the step's directions."""
        assert (
            self.sample_rate is not None
            and self.expected_batch_size is not None
            and self._estimator is not None
        )
        sigma, q = self.effective_noise_multiplier, self.sample_rate
        sums = (
            self._zo_sums
            if self._zo_sums is not None
            else torch.zeros(self.num_directions, dtype=torch.int64)
        )
        self._zo_sums = None
        if not self.within_budget(sigma, q):
            self._stop_on_budget()
            return
        grads = self.privatize(sums) / self.expected_batch_size  # [n]
        self._record_step(sigma, q)  # charged (and in the ledger) before θ moves
        self.last_projected_grads = grads
        for seed, g in zip(self.direction_seeds(self._current_step()), grads.tolist()):
            self._estimator.add_direction(seed, -lr * g / self.num_directions)

    # ------------------------------------------------------------------------------------ checkpoints
    @override
    def dp_state_dict(self) -> dict[str, Any]:
        state = super().dp_state_dict()
        state["dpzo"] = {
            "noise": self.noise,
            "num_directions": self.num_directions,
            "pure_dp": self.pure_dp,
            "lmo": None if self.lmo is None else self.lmo.to_dict(),
        }
        return state

    @override
    def _apply_dp_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("dpzo")
        mine = None if self.lmo is None else self.lmo.to_dict()
        if saved is not None and (saved["noise"], saved["pure_dp"], saved.get("lmo")) != (
            self.noise,
            self.pure_dp,
            mine,
        ):
            raise DPLightningError(
                f"checkpoint was trained with noise={saved['noise']} (pure ε: {saved['pure_dp']}); "
                f"this run uses noise={self.noise} (pure ε: {self.pure_dp}); resume with the same settings"
            )
        super()._apply_dp_state(state)

    @override
    def _discard_unreleased(self) -> None:
        self._zo_sums = None

    @override
    def teardown(self) -> None:
        self._discard_unreleased()
        if self._estimator is not None:
            self._estimator.remove()
            self._estimator = None
        super().teardown()


__all__ = [
    "DPZOStrategy",
    "PureLaplaceAccountant",
    "ZerothOrderEstimator",
    "direction_seed",
    "parameter_seed",
    "pure_laplace_multiplier",
]
