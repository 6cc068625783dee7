"""DP-SGD as a Lightning ``Strategy``: Poisson batches, per-example clipping by groups, Gaussian noise.

One logical step (see DESIGN §2)::

    Poisson batch (rate q, may be empty) -> training_step (mean of per-example losses)
      -> backward; hooks give per-example grads of trainable params [B, *shape]
      -> clip per group g to C_g, sum over examples (accumulated over micro-batches)
      -> + N(0, (sigma_g C_g)^2) per group, once per logical step
      -> / expected batch size qN  -> optimizer.step -> accountant.step(sigma_eff, q)

``sigma_eff = (sum_g sigma_g^-2)^(-1/2)`` is what the step costs: the group releases together form one Gaussian
mechanism of that multiplier. By default every group gets the same absolute noise std ``sigma * C_total`` with
``C_total = sqrt(sum_g C_g^2)``, so ``sigma_eff = sigma``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from dplightning.checkpoint_io import AtomicCheckpointIO
from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.privacy.accounting import StepEvent, make_accountant, noise_for_target
from dplightning.privacy.batch_selection import PoissonBatchSampler
from dplightning.privacy.clipping import (
    CLIPPING_MODES,
    ClippingMode,
    clip_to_grid_and_sum,
    group_grids,
    make_groups,
)
from dplightning.privacy.discretization import from_grid
from dplightning.privacy.mechanisms import LMOMechanism
from dplightning.privacy.noise_addition import NoiseSource
from dplightning.privacy.per_example_grads import LossReduction, PerExampleGradients


def batch_size_of(batch: Any) -> int | None:
    """Leading dimension of the first tensor found in ``batch`` (dict / sequence / tensor), else ``None``."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items: Any = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        return None
    for item in items:
        size = batch_size_of(item)
        if size is not None:
            return size
    return None


class EmptySafeCollate:
    """Wraps a ``collate_fn`` so an empty Poisson batch collates to a zero-length batch of the right structure
    (collate one real example, slice every tensor to length 0): default collate fails on ``[]``."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Any) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, items: list[Any]) -> Any:
        if items:
            return self.collate_fn(items)
        template = self.collate_fn([self.dataset[0]])
        return apply_to_collection(template, Tensor, lambda t: t[:0])


_warned_seeded = False


def warn_if_seeded(secure_rng: bool) -> None:
    """Once per process: seeded noise and batches are only private while the seed stays secret."""
    global _warned_seeded
    if secure_rng or _warned_seeded:
        return
    _warned_seeded = True
    rank_zero_warn(
        "secure_rng=False: the noise and the Poisson batches follow the strategy's seed, so the privacy guarantee "
        "holds only while that seed is secret (anyone with the config can replay the noise). Set secure_rng=True "
        "(OS CSPRNG, not reproducible) for a model or logs that leave your control.",
        category=UserWarning,
    )


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def short_group_name(group: str) -> str:
    """Readable group name for logs: drops the peft wrapper prefixes."""
    for prefix in ("model.base_model.model.model.", "model.base_model.model.", "model."):
        if group.startswith(prefix):
            return group[len(prefix) :]
    return group


class DPSGDMixin:
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
            (what the accounting assumes). ``False`` keeps shuffled fixed-size batches (accounting then approximate).
        secure_rng: draw noise and batches from the OS CSPRNG (not reproducible; a resumed secure run stays
            secure). With ``False`` (default) noise and batches follow ``seed``, fast and reproducible, and the
            guarantee assumes the seed is secret: a warning says so once per process.
        seed: seed of the noise generator and the Poisson sampler.
        loss_reduction: how ``training_step``'s loss reduces per-example losses (``"mean"`` or ``"sum"``).
        device: ``"auto"`` (CUDA if available, else CPU) or an explicit device.
        noise: ``"gaussian"`` or ``"lmo"`` (issue 7: i.i.d. LMO noise ``σ·C·n`` per coordinate, n ~ ``lmo``, with
            ``clipping="flat_l1"`` and ``accountant="rdp"``; σ is then the LMO multiplier, see
            :mod:`dplightning.privacy.lmo_accounting`).
        lmo: the :class:`~dplightning.privacy.mechanisms.LMOMechanism` (or its parameter dict) for ``noise="lmo"``.
    """

    def _dp_init(
        self,
        noise_multiplier: float | None,
        max_grad_norm: float,
        clipping: ClippingMode,
        target_epsilon: float | None,
        target_delta: float,
        accountant: Literal["pld", "rdp"],
        poisson_sampling: bool,
        secure_rng: bool,
        seed: int,
        loss_reduction: LossReduction,
        noise: Literal["gaussian", "lmo"] = "gaussian",
        lmo: LMOMechanism | Mapping[str, Any] | None = None,
    ) -> None:
        if clipping not in CLIPPING_MODES:
            raise DPLightningError(f"unknown clipping '{clipping}'; use one of flat, per_layer, per_adapter, flat_l1")
        self._check_lmo(noise, lmo, clipping, accountant)
        self.noise = noise
        self.lmo = None if lmo is None else LMOMechanism.coerce(lmo)
        if noise_multiplier is None and target_epsilon is None:
            raise DPLightningError("DPSGDStrategy needs noise_multiplier or target_epsilon; set one of them")
        if noise_multiplier is not None and noise_multiplier < 0:
            raise DPLightningError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if target_epsilon is not None and target_epsilon <= 0:
            raise PrivacyBudgetError(f"target_epsilon must be > 0, got {target_epsilon}; pick a positive budget")
        if not 0.0 < target_delta < 1.0:
            raise DPLightningError(f"target_delta must be in (0, 1), got {target_delta}; typical is 1/N^1.1")
        if max_grad_norm <= 0:
            raise DPLightningError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = float(max_grad_norm)
        self.clipping: ClippingMode = clipping
        self.target_epsilon = target_epsilon
        self.target_delta = float(target_delta)
        self.accountant_kind = accountant
        self.accountant = make_accountant(accountant)
        self.poisson_sampling = poisson_sampling
        self.secure_rng = secure_rng
        self.seed = seed
        self.loss_reduction: LossReduction = loss_reduction
        self.noise_source = NoiseSource(seed=seed, secure=secure_rng)

        self.max_epsilon: float | None = target_epsilon  # hard guard; PrivacyBudget may tighten it
        self.sample_rate: float | None = None
        self.num_examples: int | None = None
        self.expected_batch_size: float | None = None
        self.planned_steps: int | None = None
        self.budget_exhausted = False
        self.groups: dict[str, list[str]] = {}
        self.auxiliary_noise_multipliers: dict[str, float] = {}
        # AutomaticClipping sets γ > 0: per-example C_g/(‖g‖+γ) normalisation replaces min(1, C_g/‖g‖) clipping.
        self.normalization_stability: float | None = None
        self.last_noisy_grad_norms: dict[str, float] = {}  # per group, of the released (noisy) sum: public
        # per group, per-example pre-clip norms of the last step [B]: PRIVATE, only for mechanisms that noise them
        self.private_step_norms: dict[str, Tensor] = {}
        self._shard = (0, 1)  # (rank, world size) of Poisson sampling; set by the DDP variant
        self.clip_thresholds: dict[str, float] = {}
        self.noise_multipliers: dict[str, float] = {}
        self._engine: PerExampleGradients | None = None
        self._params: dict[str, torch.nn.Parameter] = {}
        self._summed: dict[str, Tensor] = {}
        self._last_norms: dict[str, list[Tensor]] = {}
        self._safe_region: tuple[float, float, int] | None = None  # (σ_min, q_max, steps) proven within budget
        self._min_sigma_used = math.inf
        self._pending_state: dict[str, Any] | None = None
        self._sampler: PoissonBatchSampler | None = None

    @staticmethod
    def _check_lmo(noise: str, lmo: Any, clipping: str, accountant: str) -> None:
        """LMO noise (issue 7) is sound only with per-example L1 clipping and RDP accounting (DESIGN §6)."""
        if noise not in ("gaussian", "lmo"):
            raise DPLightningError(f"unknown noise '{noise}'; use gaussian or lmo")
        if noise == "lmo":
            if lmo is None:
                raise DPLightningError("noise='lmo' needs lmo=LMOMechanism(...) or its parameter dict (see lmo-search)")
            if clipping != "flat_l1":
                raise DPLightningError("noise='lmo' needs clipping='flat_l1' (its vector accounting is for L1 clipping)")
            if accountant != "rdp":
                raise DPLightningError("noise='lmo' on gradients is accounted with RDP (DESIGN §6); set accountant='rdp'")
        elif clipping == "flat_l1":
            raise DPLightningError("clipping='flat_l1' bounds the L1 norm, which Gaussian accounting ignores; set noise='lmo'")
        elif lmo is not None:
            raise DPLightningError("lmo= is only used with noise='lmo'; drop it or set noise='lmo'")

    def step_event(self, sigma: float, q: float) -> StepEvent:
        """Accounting event of one step at multiplier ``sigma`` and sample rate ``q``."""
        if getattr(self, "noise", "gaussian") != "lmo":
            return StepEvent(sigma, q)
        if self.auxiliary_noise_multipliers:
            raise DPLightningError("auxiliary Gaussian releases cannot be combined with LMO noise; use noise='gaussian'")
        return StepEvent(sigma, q, "lmo", self.lmo, "vector")

    def _noise_kwargs(self) -> dict[str, Any]:
        """Mechanism arguments of :func:`noise_for_target` for this strategy's noise."""
        if getattr(self, "noise", "gaussian") != "lmo":
            return {}
        return {"mechanism": "lmo", "lmo": self.lmo, "release": "vector"}

    # ------------------------------------------------------------------------------------ group params
    @property
    def group_names(self) -> list[str]:
        return list(self.groups)

    @property
    def effective_noise_multiplier(self) -> float:
        """σ_eff = (Σ_g σ_g^-2 + Σ_aux σ_a^-2)^-1/2, the multiplier the accountant charges per step.

        ``auxiliary_noise_multipliers`` are other Gaussian releases made from the same batch each step (e.g. noisy
        clip counts for a controller), expressed as multipliers relative to their own L2 sensitivity.
        """
        sigmas = list(self.noise_multipliers.values()) or [float(self.noise_multiplier or 0.0)]
        sigmas += list(self.auxiliary_noise_multipliers.values())
        if any(s <= 0 for s in sigmas):
            return 0.0
        return sum(s**-2 for s in sigmas) ** -0.5

    @property
    def total_clip_norm(self) -> float:
        return math.sqrt(sum(c * c for c in self.clip_thresholds.values()))

    def set_clip_thresholds(self, thresholds: float | Mapping[str, float]) -> None:
        """Set ``C_g`` for every group (a float sets all). Per-group σ_g stay, so noise std σ_g·C_g follows."""
        values = dict.fromkeys(self.groups, float(thresholds)) if isinstance(thresholds, (int, float)) else dict(thresholds)
        unknown = set(values) - set(self.groups)
        if unknown:
            raise DPLightningError(f"unknown clipping groups {sorted(unknown)[:3]}; use names from strategy.group_names")
        if any(v <= 0 for v in values.values()):
            raise DPLightningError("clip thresholds must be > 0")
        self.clip_thresholds.update(values)

    def set_noise_multipliers(self, multipliers: Mapping[str, float]) -> None:
        """Set per-group σ_g directly (heteroscedastic noise); the step is charged σ_eff."""
        unknown = set(multipliers) - set(self.groups)
        if unknown:
            raise DPLightningError(f"unknown clipping groups {sorted(unknown)[:3]}; use names from strategy.group_names")
        if any(v < 0 for v in multipliers.values()):
            raise DPLightningError("noise multipliers must be >= 0")
        self.noise_multipliers.update({k: float(v) for k, v in multipliers.items()})

    def set_noise_multiplier(self, sigma: float) -> None:
        """Isotropic noise: every group gets absolute std ``σ·C_total``, so σ_eff = σ."""
        if sigma < 0:
            raise DPLightningError(f"noise_multiplier must be >= 0, got {sigma}")
        self.noise_multiplier = float(sigma)
        c_total = self.total_clip_norm
        # The 1e-12 pad keeps the recombined σ_eff from landing an ulp below σ: the accountant rounds σ *down*
        # onto its grid, so an ulp below a grid value would be charged (and checked) one grid step lower.
        padded = sigma * (1.0 + 1e-12)
        self.noise_multipliers = {g: padded * c_total / c for g, c in self.clip_thresholds.items()}

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default ``target_delta``)."""
        return self.accountant.epsilon(self.target_delta if delta is None else delta)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        module = self.lightning_module
        assert module is not None
        if not module.automatic_optimization:
            raise DPLightningError("DPSGDStrategy needs automatic optimization; set automatic_optimization = True")
        if trainer.gradient_clip_val:
            raise DPLightningError("Trainer(gradient_clip_val=...) conflicts with DP clipping; remove it and set max_grad_norm")
        if trainer.state.fn == TrainerFn.FITTING and len(self.optimizers) != 1:
            raise DPLightningError(f"DPSGDStrategy supports exactly one optimizer, got {len(self.optimizers)}")
        if self._engine is not None:
            self._engine.remove()
        self._engine = PerExampleGradients(module, self.loss_reduction)
        self._engine.loss_scale = float(trainer.accumulate_grad_batches)  # Lightning scales the loss by 1/k
        self._params = dict(module.named_parameters())
        self._trainable = set(self._engine.param_names)
        self._sync_initial_params()
        if not self.groups:
            self.groups = make_groups(self._engine.param_names, self.clipping)
            per_group = self.max_grad_norm / math.sqrt(len(self.groups))
            self.clip_thresholds = dict.fromkeys(self.groups, per_group)
            if self.noise_multiplier is not None:
                self.set_noise_multiplier(self.noise_multiplier)
        if self._pending_state is not None:
            self._apply_dp_state(self._pending_state)
            self._pending_state = None
        warn_if_seeded(self.secure_rng)

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or trainer.state.stage != RunningStage.TRAINING or not isinstance(dataloader, DataLoader):
            return dataloader
        dataset = dataloader.dataset
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise DPLightningError("the training set is empty; check the data module")
        batch_size = dataloader.batch_size or (dataloader.batch_sampler.batch_size if dataloader.batch_sampler else 1)  # type: ignore[union-attr]
        accumulate = trainer.accumulate_grad_batches
        expected = batch_size * accumulate
        q = expected / n
        if q > 1:
            raise DPLightningError(
                f"sample rate q = batch_size*accumulate/N = {expected}/{n} > 1; lower the batch size or add data"
            )
        self.sample_rate, self.num_examples, self.expected_batch_size = q, n, float(expected)
        if not self.poisson_sampling:
            warnings.warn("poisson_sampling=False: the accountant assumes Poisson sampling; ε is approximate", stacklevel=2)
            return dataloader
        sampler = PoissonBatchSampler(
            n,
            q,
            num_batches=max(1, n // expected),
            seed=self.seed,
            micro_batches=accumulate,
            secure_rng=self.secure_rng,
            rank=self._shard[0],
            world_size=self._shard[1],
        )
        # Resuming mid-epoch: Lightning restarts the iterator, so skip the logical batches already taken.
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        sampler.epoch = trainer.current_epoch
        sampler.start_batch = ready // accumulate
        self._sampler = sampler
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=EmptySafeCollate(dataloader.collate_fn, dataset),
            num_workers=dataloader.num_workers,
            pin_memory=dataloader.pin_memory,
            worker_init_fn=dataloader.worker_init_fn,
        )

    def _check_training_batches(self) -> None:
        """Refuse loop settings under which a step would not release exactly one complete Poisson batch."""
        trainer = self.lightning_module.trainer
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        if combined is not None and len(combined.flattened) > 1:
            # Each loader would get its own sampler and sample rate, and a short one is replayed within the epoch.
            raise DPLightningError(
                f"{type(self).__name__} supports one training dataloader, got {len(combined.flattened)}; "
                "concatenate the datasets into one (torch.utils.data.ConcatDataset)"
            )
        accumulate = trainer.accumulate_grad_batches
        batches = trainer.num_training_batches
        if self.poisson_sampling and math.isfinite(batches) and batches % accumulate:
            # Lightning steps on an unfinished accumulation at the end of the epoch: part of a Poisson batch.
            raise DPLightningError(
                f"{int(batches)} training batches per epoch is not a multiple of accumulate_grad_batches="
                f"{accumulate}: the last step of each epoch would release part of a Poisson batch; set "
                f"limit_train_batches to a multiple of {accumulate} (or remove it)"
            )

    def _plan_steps(self) -> int:
        """Set ``planned_steps`` from the trainer's plan; returns the planned steps not yet taken."""
        if self.sample_rate is None:
            raise DPLightningError(f"{type(self).__name__} could not find the training dataloader to set the sample rate")
        self._check_training_batches()
        steps = self.lightning_module.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise DPLightningError("DP training needs a planned length; set trainer max_steps or max_epochs")
        self.planned_steps = int(steps)
        return max(self.planned_steps - self.accountant.steps, 0)

    def on_train_start(self) -> None:
        super().on_train_start()
        remaining = self._plan_steps()
        if self.noise_multiplier is None:
            assert self.target_epsilon is not None
            sigma = noise_for_target(
                self.target_epsilon, self.target_delta, self.sample_rate, self.planned_steps, accountant=self.accountant_kind,
                **self._noise_kwargs(),
            )
            self.set_noise_multiplier(sigma)
            rank_zero_info(
                f"[dplightning] calibrated noise_multiplier={sigma:.4f} for ε={self.target_epsilon}, "
                f"δ={self.target_delta}, q={self.sample_rate:.4g}, steps={self.planned_steps}"
            )
        if self.max_epsilon is None or remaining == 0:
            return
        sigma = self.effective_noise_multiplier
        final = self.accountant.epsilon_with(self.target_delta, [(self.step_event(sigma, self.sample_rate), remaining)])
        if self.target_epsilon is not None and final > self.target_epsilon * (1 + 1e-9) and self.accountant.steps == 0:
            # A fresh plan that breaks the strategy's budget is refused up front. (A PrivacyBudget callback's
            # target alone only stops the run early; on resume σ may have been moved by a controller, whose own
            # guard and the per-step guard below keep ε within budget.)
            raise PrivacyBudgetError(
                f"planned {self.planned_steps} steps at noise_multiplier={sigma:.4g}, q={self.sample_rate:.4g} spend "
                f"ε={final:.3g} > target {self.target_epsilon}; raise noise_multiplier, lower max_steps, or drop "
                "noise_multiplier and let target_epsilon calibrate σ"
            )
        if final <= self.max_epsilon:
            self._safe_region = (sigma, self.sample_rate, self.accountant.steps + remaining)

    # ------------------------------------------------------------------------------------- one step
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        size = batch_size_of(batch)
        if size == 0:
            # An empty Poisson batch is still a step: the release is pure noise. Skip the model entirely.
            return torch.zeros((), device=self.root_device, requires_grad=True)
        if self._engine is not None:
            # Every hooked layer must see exactly this many examples in its leading dimension; a layer fed
            # flattened tokens would otherwise be clipped per token.
            self._engine.expected_batch_size = size
        return super().training_step(*args, **kwargs)

    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        out = super().backward(closure_loss, optimizer, *args, **kwargs)
        assert self._engine is not None
        grads = self._engine.pop()
        if grads:
            summed, norms = clip_to_grid_and_sum(
                grads, self.groups, self.clip_thresholds, self.grids(), p=self._norm_order,
                stability=self.normalization_stability,
            )
            for name, value in summed.items():
                prev = self._summed.get(name)
                self._summed[name] = value if prev is None else prev + value
            for group, value in norms.items():
                self._last_norms.setdefault(group, []).append(value.detach())
        return out

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        def private_closure() -> Any:
            result = closure()
            self.release_noisy_gradient()
            return result

        return super().optimizer_step(optimizer, private_closure, model, **kwargs)

    @property
    def _norm_order(self) -> float:
        return 1.0 if self.clipping == "flat_l1" else 2.0

    def grids(self) -> dict[str, float]:
        """Grid ``γ_g`` of each group at the current thresholds: clipped sums and releases are integers times it
        (:mod:`dplightning.privacy.discretization`)."""
        sizes = {n: self._params[n].numel() for names in self.groups.values() for n in names}
        return group_grids(self.groups, sizes, self.clip_thresholds, self._norm_order)

    def within_budget(self, sigma: float, q: float) -> bool:
        """Would one more step at (σ, q) keep ε ≤ max_epsilon? Cheap when inside the proven-safe region."""
        if self.max_epsilon is None:
            return True
        if self._safe_region is not None:
            sigma_min, q_max, steps = self._safe_region
            # Monotone: fewer steps, larger σ and smaller q each lower ε, so this dominates the planned run.
            # LMO: ε is not proven monotone in the multiplier, so only the exact planned multiplier is covered
            exact = getattr(self, "noise", "gaussian") != "lmo" or (
                sigma == sigma_min and self._min_sigma_used in (math.inf, sigma_min)
            )
            if exact and min(self._min_sigma_used, sigma) >= sigma_min and q <= q_max and self.accountant.steps + 1 <= steps:
                return True
        if sigma <= 0:
            return False
        eps = self.accountant.epsilon_with(self.target_delta, [(self.step_event(sigma, q), 1)])
        return eps <= self.max_epsilon

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
            self.budget_exhausted = True
            self.lightning_module.trainer.should_stop = True
            rank_zero_info(f"[dplightning] privacy budget ε={self.max_epsilon} reached; stopping before the next step")
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
            for name in names:
                p = self._params[name]
                units = sums[name]
                if std > 0:
                    units = units + self._draw_noise(p.shape, std, p.device)
                p.grad = (from_grid(units, grid) / self.expected_batch_size).to(p.dtype)
            self.last_noisy_grad_norms[group] = math.sqrt(sum(float(self._params[n].grad.pow(2).sum()) for n in names))
        self._summed.clear()
        # Keep this step's per-example norms (PRIVATE: only for mechanisms that privatise them) and start afresh.
        self.private_step_norms = {g: torch.cat(v) for g, v in self._last_norms.items()}
        self._last_norms.clear()
        self.accountant.record(self.step_event(sigma_eff, q))
        self._min_sigma_used = min(self._min_sigma_used, sigma_eff)

    # Hooks the DDP variant overrides: single-device versions are identities.
    def _sync_initial_params(self) -> None:
        """Make every rank start from the same weights (DDP broadcasts from rank 0)."""

    def _reduce_sums(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum the clipped per-example gradient sums over ranks."""
        return sums

    def _draw_noise(self, shape: torch.Size, std: float, device: torch.device) -> Tensor:
        """Integer noise (grid units) for one tensor; identical on every rank so it is added once in total."""
        if getattr(self, "noise", "gaussian") == "lmo":
            assert self.lmo is not None
            return self.noise_source.discrete_lmo(shape, self.lmo, std).to(device)  # i.i.d., factor σ·C/γ
        return self.noise_source.discrete_gaussian(shape, std).to(device)

    # ------------------------------------------------------------------------------------ checkpoints
    def dp_state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(),
            "noise": self.noise_source.state_dict(),
            "clip_thresholds": dict(self.clip_thresholds),
            "noise_multipliers": dict(self.noise_multipliers),
            "noise_multiplier": self.noise_multiplier,
            "auxiliary_noise_multipliers": dict(self.auxiliary_noise_multipliers),
            "min_sigma_used": self._min_sigma_used,
        }

    def _apply_dp_state(self, state: Mapping[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.noise_source.load_state_dict(state["noise"])
        # A secure run stays secure (and a secure checkpoint's successor too): batches follow the noise source.
        self.secure_rng = self.noise_source.secure
        if self._sampler is not None:
            self._sampler.secure_rng = self.secure_rng
        self.clip_thresholds = dict(state["clip_thresholds"])
        self.noise_multipliers = dict(state["noise_multipliers"])
        self.noise_multiplier = state["noise_multiplier"]
        self.auxiliary_noise_multipliers = dict(state.get("auxiliary_noise_multipliers", {}))
        self._min_sigma_used = state["min_sigma_used"]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        checkpoint["dplightning"] = self.dp_state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False)
        state = checkpoint.get("dplightning")
        if state is not None:
            if not self.groups:
                self._pending_state = state
            else:
                self._apply_dp_state(state)
        return checkpoint

    def teardown(self) -> None:
        if self._engine is not None:
            self._engine.remove()
            self._engine = None
        super().teardown()



class DPSGDStrategy(DPSGDMixin, SingleDeviceStrategy):
    __doc__ = DPSGDMixin.__doc__
    strategy_name = "dpsgd"

    def __init__(
        self,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        clipping: ClippingMode = "flat",
        target_epsilon: float | None = None,
        target_delta: float = 1e-5,
        accountant: Literal["pld", "rdp"] = "pld",
        poisson_sampling: bool = True,
        secure_rng: bool = False,
        seed: int = 0,
        loss_reduction: LossReduction = "mean",
        device: str | torch.device = "auto",
        checkpoint_io: CheckpointIO | None = None,
        noise: Literal["gaussian", "lmo"] = "gaussian",
        lmo: LMOMechanism | Mapping[str, Any] | None = None,
    ) -> None:
        SingleDeviceStrategy.__init__(
            self, device=_resolve_device(device), checkpoint_io=checkpoint_io or AtomicCheckpointIO()
        )
        self._dp_init(
            noise_multiplier, max_grad_norm, clipping, target_epsilon, target_delta, accountant,
            poisson_sampling, secure_rng, seed, loss_reduction, noise, lmo,
        )


class DDPDPSGDStrategy(DPSGDMixin, DDPStrategy):
    """DP-SGD across processes (Lightning DDP launcher, any backend; ``gloo`` on CPU).

    Every rank draws the same global Poisson mask (shared seed) and keeps its shard ``index % world == rank``,
    so the union of the ranks' batches is exactly the single-process Poisson batch. The model is *not* wrapped
    in ``DistributedDataParallel``: each rank clips its own examples, the clipped sums are all-reduced once per
    step, and the same seeded noise is added on every rank after the reduction (noise enters once in total;
    with ``secure_rng`` rank 0 draws it and broadcasts). All ranks therefore apply the same update.
    """

    strategy_name = "ddp_dpsgd"

    def __init__(
        self,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        clipping: ClippingMode = "flat",
        target_epsilon: float | None = None,
        target_delta: float = 1e-5,
        accountant: Literal["pld", "rdp"] = "pld",
        poisson_sampling: bool = True,
        secure_rng: bool = False,
        seed: int = 0,
        loss_reduction: LossReduction = "mean",
        process_group_backend: str | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        checkpoint_io: CheckpointIO | None = None,
    ) -> None:
        DDPStrategy.__init__(
            self,
            process_group_backend=process_group_backend,
            start_method=start_method,
            checkpoint_io=checkpoint_io or AtomicCheckpointIO(),
        )
        self._dp_init(
            noise_multiplier, max_grad_norm, clipping, target_epsilon, target_delta, accountant,
            poisson_sampling, secure_rng, seed, loss_reduction,
        )

    def setup(self, trainer: pl.Trainer) -> None:
        self._shard = (self.global_rank, self.world_size)
        super().setup(trainer)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # no DistributedDataParallel wrapper: clipped sums are reduced explicitly

    def _sync_initial_params(self) -> None:
        for p in self.lightning_module.parameters():
            torch.distributed.broadcast(p.data, src=0)

    def _reduce_sums(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        names = list(sums)
        flat = torch.cat([sums[n].reshape(-1) for n in names])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        out, offset = {}, 0
        for n in names:
            size = sums[n].numel()
            out[n] = flat[offset : offset + size].view_as(sums[n])
            offset += size
        return out

    def _draw_noise(self, shape: torch.Size, std: float, device: torch.device) -> Tensor:
        noise = super()._draw_noise(shape, std, device)
        if self.secure_rng:  # CSPRNG draws differ per rank: use rank 0's
            torch.distributed.broadcast(noise, src=0)
        return noise
