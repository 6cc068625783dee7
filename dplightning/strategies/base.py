"""What every private strategy shares, whatever it releases: Poisson batches, the step plan, σ calibration,
the budget guard, clip thresholds and noise multipliers by group, and the DP state kept in checkpoints.

:class:`PrivateStrategyMixin` is mixed in before the Lightning strategy class (``SingleDeviceStrategy`` or
``DDPStrategy``); a concrete strategy adds its release (DP-SGD's noised gradient sum, DP-ZO's noised scalars)
through :meth:`~PrivateStrategyMixin.step_event`, from which :meth:`~PrivateStrategyMixin.calibrate` finds σ.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    Callback,
    GradientAccumulationScheduler,
    LearningRateFinder,
)
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from dplightning.errors import DPLightningError, PrivacyBudgetError
from dplightning.privacy.accounting import StepEvent, make_accountant, noise_for_target
from dplightning.privacy.accounting.base import history_entry
from dplightning.privacy.batch_selection import PoissonBatchSampler
from dplightning.privacy.noise_addition import NoiseSource
from dplightning.strategies.batches import EmptySafeCollate, fixed_width
from dplightning.strategies.checkpointing import PrivateCheckpointMixin, resume_position
from dplightning.strategies.settings import PrivacySettings

# Lightning callbacks that break what the accountant assumes (subclasses too), with why and what to do instead.
_REFUSED_CALLBACKS: tuple[tuple[type[Callback], str], ...] = (
    (
        GradientAccumulationScheduler,
        "it changes accumulate_grad_batches after the sample rate and the Poisson batches were set, so one release "
        "would sum several Poisson batches (a record could be in it more than once) while one step is charged; "
        "set Trainer(accumulate_grad_batches=k) once instead",
    ),
    (
        LearningRateFinder,
        "it chooses the learning rate from the raw loss of private batches (not covered by ε) and its trial "
        "steps spend the budget; tune the rate on public data (a run of the bundled synthetic notes) instead",
    ),
    (
        BatchSizeFinder,
        "its choice depends on how private batches ran, and its trial steps spend the budget; choose the batch "
        "size on public data instead",
    ),
)

_warned_seeded = False


def warn_if_seeded(secure_rng: bool) -> None:
    """Once per process: seeded noise and batches are only private while the seed stays secret."""
    global _warned_seeded
    if secure_rng or _warned_seeded:
        return
    _warned_seeded = True
    rank_zero_warn(
        "seeded noise: the noise and the Poisson batches follow the strategy's seed, so the privacy guarantee "
        "holds only while that seed is secret (it is in the run's config and checkpoints; anyone with it can replay "
        "the noise). Remove the strategy's seed (OS CSPRNG, not reproducible) for a model or logs that leave your "
        "control.",
        category=UserWarning,
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: the first CUDA device if there is one, else the CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def short_group_name(group: str) -> str:
    """Readable group name for logs: drops the peft wrapper prefixes."""
    for prefix in ("model.base_model.model.model.", "model.base_model.model.", "model."):
        if group.startswith(prefix):
            return group[len(prefix) :]
    return group


class PrivateStrategyMixin(PrivateCheckpointMixin):
    """Shared body of the private strategies; satisfies :class:`~dplightning.strategies.protocol.PrivateStrategy`.

    Subclasses validate their settings and call :meth:`_init_private` from ``__init__`` (after the Lightning
    strategy's ``__init__``), and implement :meth:`step_event` (from which :meth:`calibrate` finds the
    multiplier; a release the (ε, δ) accountants do not describe overrides it). Their ``setup`` ends with
    :meth:`_finish_setup`; their release calls :meth:`within_budget`, then :meth:`_record_step` or
    :meth:`_stop_on_budget`.
    """

    # on_train_start refuses a plan whose remaining steps would overspend target_epsilon; this says whether a
    # resumed run is refused too, or only a fresh one.
    _refuse_overspending_resume: ClassVar[bool] = True
    # How that refusal names what target_epsilon would calibrate.
    _calibrated_name: ClassVar[str] = "σ"
    # The mechanism's name ("gaussian", "laplace", "lmo"): the subclass sets it from its own ``noise`` argument.
    noise: str

    def _init_private(self, settings: PrivacySettings) -> None:
        """Set the state every private strategy keeps from ``settings``, which the subclass has validated
        (:meth:`PrivacySettings.validate`, among its own checks). The mechanism's own attributes (``noise``,
        ``lmo``) are the subclass's to set."""
        self.noise_multiplier = settings.noise_multiplier
        self.target_epsilon = settings.target_epsilon
        self.target_delta = float(settings.target_delta)
        self.accountant_kind = settings.accountant
        self.accountant = make_accountant(settings.accountant)
        self.poisson_sampling = settings.poisson_sampling
        self.secure_rng, self.seed = settings.randomness()
        self.noise_source = NoiseSource(seed=self.seed, secure=self.secure_rng)

        self.max_epsilon: float | None = settings.target_epsilon  # hard guard; PrivacyBudget may tighten it
        self.sample_rate: float | None = None
        self.num_examples: int | None = None
        self.expected_batch_size: float | None = None
        self.planned_steps: int | None = None
        self.budget_exhausted = False
        self.groups: dict[str, list[str]] = {}
        self.clip_thresholds: dict[str, float] = {}
        self.noise_multipliers: dict[str, float] = {}
        self.auxiliary_noise_multipliers: dict[str, float] = {}
        self._params: dict[str, torch.nn.Parameter] = {}
        self._trainable: set[str] = set()
        self._shard = (0, 1)  # (rank, world size) of Poisson sampling; set by a DDP variant
        self._safe_region: tuple[float, float, int] | None = (
            None  # (σ_min, q_max, steps) proven within budget
        )
        self._min_sigma_used = math.inf
        self._sampler: PoissonBatchSampler | None = None
        # accumulate_grad_batches the sample rate and the Poisson batches were set for
        self._planned_accumulate: int | None = None
        self._window_micro_batches = 0  # micro-batches summed since the window began (none released yet)
        # (fit, epoch, window index) those micro-batches belong to
        self._window: tuple[int, int, int] | None = None
        self._fits = 0
        self._init_checkpointing()

    @property
    def _attached_module(self) -> pl.LightningModule:
        """The LightningModule being trained: every hook that reads it runs after the Trainer attached one."""
        module = self.lightning_module
        if module is None:
            raise DPLightningError(f"{type(self).__name__} is not attached to a LightningModule yet")
        return module

    # ------------------------------------------------------------------------------------ mechanism
    @abstractmethod
    def step_event(self, sigma: float, q: float) -> StepEvent:
        """Accounting event of one step at multiplier ``sigma`` and sample rate ``q``."""

    def calibrate(self, target_epsilon: float, steps: int) -> float:
        """Smallest multiplier whose ``steps`` releases stay within ``target_epsilon`` at ``target_delta``: the
        accountant's calibration for the release that :meth:`step_event` describes."""
        assert self.sample_rate is not None
        event = self.step_event(1.0, self.sample_rate)  # the multiplier is what is sought: 1 is a placeholder
        return noise_for_target(
            target_epsilon,
            self.target_delta,
            self.sample_rate,
            steps,
            accountant=self.accountant_kind,
            mechanism=event.mechanism,
            lmo=event.lmo,
            release=event.release,
        )

    def _calibrate_noise_multiplier(self) -> None:
        """Set the multiplier from :meth:`calibrate` for the planned steps (called at train start when
        ``noise_multiplier`` is ``None``), and say so."""
        assert self.target_epsilon is not None and self.planned_steps is not None
        self.set_noise_multiplier(self.calibrate(self.target_epsilon, self.planned_steps))
        rank_zero_info(
            f"[dplightning] calibrated {self.noise} noise_multiplier={self.noise_multiplier:.4f} for "
            f"ε={self.target_epsilon}, δ={self.target_delta}, q={self.sample_rate:.4g}, steps={self.planned_steps}"
        )

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
        values = (
            dict.fromkeys(self.groups, float(thresholds))
            if isinstance(thresholds, (int, float))
            else dict(thresholds)
        )
        unknown = set(values) - set(self.groups)
        if unknown:
            raise DPLightningError(
                f"unknown clipping groups {sorted(unknown)[:3]}; use names from strategy.group_names"
            )
        if not all(0 < v < math.inf for v in values.values()):  # also refuses NaN
            raise DPLightningError("clip thresholds must be finite and > 0")
        self.clip_thresholds.update(values)

    def set_noise_multipliers(self, multipliers: Mapping[str, float]) -> None:
        """Set per-group σ_g directly (heteroscedastic noise); the step is charged σ_eff."""
        unknown = set(multipliers) - set(self.groups)
        if unknown:
            raise DPLightningError(
                f"unknown clipping groups {sorted(unknown)[:3]}; use names from strategy.group_names"
            )
        if not all(0 <= v < math.inf for v in multipliers.values()):  # also refuses NaN
            raise DPLightningError("noise multipliers must be finite and >= 0")
        self.noise_multipliers.update({k: float(v) for k, v in multipliers.items()})

    def set_noise_multiplier(self, sigma: float) -> None:
        """Isotropic noise: every group gets absolute std ``σ·C_total``, so σ_eff = σ."""
        if not 0 <= sigma < math.inf:  # also refuses NaN
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
    def _check_optimization(
        self, trainer: pl.Trainer, module: pl.LightningModule, *, clip_conflict: str, one_optimizer: str
    ) -> None:
        """Refuse what the private step cannot honour: manual optimization, Lightning's own gradient clipping
        (``clip_conflict`` says why), several optimizers when fitting (``one_optimizer`` says what is needed)."""
        if not module.automatic_optimization:
            raise DPLightningError(
                f"{type(self).__name__} needs automatic optimization; set automatic_optimization = True"
            )
        if trainer.gradient_clip_val:
            raise DPLightningError(f"Trainer(gradient_clip_val=...) {clip_conflict}")
        if trainer.state.fn == TrainerFn.FITTING and len(self.optimizers) != 1:
            raise DPLightningError(f"{one_optimizer}, got {len(self.optimizers)}")
        for callback in getattr(trainer, "callbacks", []):
            for refused, reason in _REFUSED_CALLBACKS:
                if isinstance(callback, refused):
                    raise DPLightningError(
                        f"{type(callback).__name__} cannot run with {type(self).__name__}: {reason}"
                    )

    def _finish_setup(self) -> None:
        """End of a subclass's ``setup``, once its groups exist: apply DP state loaded before them, warn once
        about seeded noise."""
        if self._pending_state is not None:
            self._apply_dp_state(self._pending_state)
            self._pending_state = None
        warn_if_seeded(self.secure_rng)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if (
            trainer is None
            or trainer.state.stage != RunningStage.TRAINING
            or not isinstance(dataloader, DataLoader)
        ):
            return dataloader
        dataset = dataloader.dataset
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise DPLightningError("the training set is empty; check the data module")
        batch_size = dataloader.batch_size or (
            dataloader.batch_sampler.batch_size  # type: ignore[attr-defined]
            if dataloader.batch_sampler
            else 1
        )
        accumulate = trainer.accumulate_grad_batches
        self._planned_accumulate = accumulate
        expected = batch_size * accumulate
        q = expected / n
        if q > 1:
            raise DPLightningError(
                f"sample rate q = batch_size*accumulate/N = {expected}/{n} > 1; lower the batch size or add data"
            )
        self.sample_rate, self.num_examples, self.expected_batch_size = q, n, float(expected)
        if not self.poisson_sampling:
            warnings.warn(
                "poisson_sampling=False: shuffled fixed-size batches are not what the accountant assumes "
                "(Poisson sampling), and shuffling can be less private at the same q: the reported ε is not a "
                "guarantee for this run (approximate at best); keep poisson_sampling: true for one",
                stacklevel=2,
            )
            dataloader.collate_fn = fixed_width(dataloader.collate_fn, self.lightning_module)
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
        sampler.epoch = trainer.current_epoch
        sampler.start_batch = self._micro_batches_taken(trainer, accumulate) // accumulate
        self._sampler = sampler
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=EmptySafeCollate(fixed_width(dataloader.collate_fn, self.lightning_module), dataset),
            num_workers=dataloader.num_workers,
            pin_memory=dataloader.pin_memory,
            worker_init_fn=dataloader.worker_init_fn,
        )

    def _micro_batches_taken(self, trainer: pl.Trainer, accumulate: int) -> int:
        """Micro-batches of the current epoch that a resumed run already took (0 for a fresh run, and for a loader
        reloaded at a new epoch, when the progress still counts the previous epoch's).

        Refused: a checkpoint inside an accumulation window (saved by an older version; checkpoints are now
        written as of the window's start), and one written with another ``accumulate_grad_batches`` mid-epoch
        (the logical batches taken would be counted wrongly, and a seeded run would draw some masks again).
        Either way later releases would not each be one Poisson batch."""
        if not trainer.fit_loop.restarting:
            return 0
        taken = resume_position(trainer.fit_loop.epoch_loop.batch_progress.current.state_dict())
        before = self._restored_accumulate
        if taken and before is not None and before != accumulate:
            raise DPLightningError(
                f"this checkpoint was written mid-epoch with accumulate_grad_batches={before}, and this run has "
                f"{accumulate}; resume with accumulate_grad_batches={before}, or from a checkpoint at the end of an "
                "epoch"
            )
        if taken % accumulate:
            raise DPLightningError(
                f"this checkpoint was saved after micro-batch {taken} of the epoch, inside an accumulation window of "
                f"{accumulate} (an older version wrote such checkpoints): resumed from there, each private step "
                "would mix two Poisson batches. Resume from a checkpoint written at an optimizer step"
            )
        return taken

    def _check_training_batches(self) -> None:
        """Refuse loop settings under which a step would not release exactly one complete Poisson batch."""
        trainer = self._attached_module.trainer
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
        every = getattr(trainer, "val_check_batch", None)
        if self.poisson_sampling and accumulate > 1 and isinstance(every, int) and every % accumulate:
            # A checkpoint is written as of the step before (see _rewind_to_step), so a resume redoes the window
            # and that validation again, on the same weights.
            rank_zero_warn(
                f"validation every {every} batches falls inside accumulation windows of {accumulate}, where the "
                "weights have not changed; a checkpoint taken there resumes at the window's start and repeats that "
                "validation (EarlyStopping counts it twice). Set val_check_interval to a multiple of "
                f"{accumulate}"
            )

    def _check_accumulation(self) -> None:
        """Refuse a step whose accumulation differs from the one the sample rate and the Poisson batches were set
        for (something changed ``accumulate_grad_batches`` during training): its release would not be the
        accounted one."""
        k = self._attached_module.trainer.accumulate_grad_batches
        if self._planned_accumulate is not None and k != self._planned_accumulate:
            raise DPLightningError(
                f"accumulate_grad_batches changed from {self._planned_accumulate} to {k} during training; the sample rate "
                "and the Poisson batches were set for the first value, so keep it fixed for the whole run"
            )

    # ------------------------------------------------------------------------------ accumulation windows
    @abstractmethod
    def _discard_unreleased(self) -> None:
        """Drop the clipped sums (and anything else private) gathered for a release that was never made."""

    def _start_window(self) -> None:
        self._discard_unreleased()
        self._window_micro_batches = 0

    def _enter_micro_batch(self) -> None:
        """Count the micro-batch about to be summed into the current window, first dropping the sums of an
        earlier window that were never released: an epoch cut short (on_train_batch_start returning -1), a stop
        or an exception inside a window and then another fit. Keyed by the window's own position, not by a hook,
        so that a micro-batch Lightning skips cannot make two windows' sums one release (a record could count
        twice, drawn by two Poisson batches for one charged step)."""
        trainer = self._attached_module.trainer
        accumulate = self._planned_accumulate or trainer.accumulate_grad_batches
        window = (self._fits, trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx // accumulate)
        if window != self._window:
            self._start_window()
            self._window = window
        self._window_micro_batches += 1

    def _check_window_complete(self) -> None:
        """Refuse a release that does not sum exactly the micro-batches of one window (what q was set for)."""
        planned = self._planned_accumulate
        if self.poisson_sampling and planned is not None and self._window_micro_batches != planned:
            raise DPLightningError(
                f"this step's release would sum {self._window_micro_batches} micro-batches, but the sample rate "
                f"and the Poisson batches were set for accumulate_grad_batches={planned}: a micro-batch of this "
                "window was skipped or run outside Trainer.fit; every micro-batch must be trained, none skipped"
            )

    def _plan_steps(self) -> int:
        """Set ``planned_steps`` from the trainer's plan; returns the planned steps not yet taken."""
        if self.sample_rate is None:
            raise DPLightningError(
                f"{type(self).__name__} could not find the training dataloader to set the sample rate"
            )
        self._check_training_batches()
        steps = self._attached_module.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise DPLightningError("DP training needs a planned length; set trainer max_steps or max_epochs")
        self.planned_steps = int(steps)
        return max(self.planned_steps - self.accountant.steps, 0)

    @override
    def on_train_start(self) -> None:
        # Runs after the callbacks' on_train_start: a callback that set σ there (NoiseSchedule) is not overridden.
        super().on_train_start()
        # A step an earlier fit's exception left unapplied is in that fit's checkpoint, not in this run; sums an
        # earlier fit gathered and never released are not this run's either.
        self._release_unapplied = False
        self._fits += 1  # a new key for every window of this fit
        self._start_window()
        remaining = self._plan_steps()
        if self.noise_multiplier is None:
            assert self.target_epsilon is not None
            self._calibrate_noise_multiplier()
        if self.max_epsilon is None or remaining == 0:
            return
        assert self.sample_rate is not None
        sigma = self.effective_noise_multiplier
        final = self.accountant.epsilon_with(
            self.target_delta, [(self.step_event(sigma, self.sample_rate), remaining)]
        )
        fresh = self.accountant.steps == 0
        overspends = self.target_epsilon is not None and final > self.target_epsilon * (1 + 1e-9)
        if overspends and (fresh or self._refuse_overspending_resume):
            raise PrivacyBudgetError(
                f"planned {self.planned_steps} steps at noise_multiplier={sigma:.4g}, q={self.sample_rate:.4g} spend "
                f"ε={final:.3g} > target {self.target_epsilon}; raise noise_multiplier, lower max_steps, or drop "
                f"noise_multiplier and let target_epsilon calibrate {self._calibrated_name}"
            )
        if final <= self.max_epsilon:
            self._safe_region = (sigma, self.sample_rate, self.accountant.steps + remaining)

    # ------------------------------------------------------------------------------------- budget
    def within_budget(self, sigma: float, q: float) -> bool:
        """Would one more step at (σ, q) keep ε ≤ max_epsilon? Cheap when inside the proven-safe region."""
        if self.max_epsilon is None:
            return True
        if self._safe_region is not None:
            sigma_min, q_max, steps = self._safe_region
            # Monotone: fewer steps, larger σ and smaller q each lower ε, so this dominates the planned run.
            # LMO: ε is not proven monotone in the multiplier, so only the exact planned multiplier is covered
            exact = self.noise != "lmo" or (
                sigma == sigma_min and self._min_sigma_used in (math.inf, sigma_min)
            )
            if (
                exact
                and min(self._min_sigma_used, sigma) >= sigma_min
                and q <= q_max
                and self.accountant.steps + 1 <= steps
            ):
                return True
        if sigma <= 0:
            return False
        eps = self.accountant.epsilon_with(self.target_delta, [(self.step_event(sigma, q), 1)])
        return eps <= self.max_epsilon

    def _record_step(self, sigma: float, q: float) -> None:
        """Charge the accountant (and the ledger, on disk, if checkpoints started one) for the step just made at
        (σ, q), before its update is applied or anything derived from it is logged."""
        event = self.step_event(sigma, q)
        for ledger in self._ledgers:
            ledger.append(history_entry(event, 1))
        self.accountant.record(event)
        self._min_sigma_used = min(self._min_sigma_used, sigma)
        self._release_unapplied = True  # until the optimizer step that applies it returns

    def _stop_on_budget(self) -> None:
        """The step was refused (nothing released): stop training cleanly."""
        self.budget_exhausted = True
        self._attached_module.trainer.should_stop = True
        rank_zero_info(
            f"[dplightning] privacy budget ε={self.max_epsilon} reached; stopping before the next step"
        )
