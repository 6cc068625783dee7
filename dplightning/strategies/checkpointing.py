"""The DP state a private strategy keeps in its checkpoints, and the privacy ledger kept beside them.

A checkpoint holds the accountant's history, the noise generator's state and the clip thresholds and noise
multipliers. Beside each checkpoint folder a :class:`~dplightning.privacy.ledger.PrivacyLedger` gets every step
before its update is applied, so a resume from an older checkpoint charges the steps its run released after it
(and a seeded run, whose noise would be replayed, is refused).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from dplightning.errors import DPLightningError
from dplightning.privacy.accounting import PrivacyAccountant
from dplightning.privacy.batch_selection import PoissonBatchSampler
from dplightning.privacy.ledger import PrivacyLedger, ResumeVerdict, read_ledgers
from dplightning.privacy.noise_addition import NoiseSource


def resume_position(counts: Mapping[str, int]) -> int:
    """The batch a resumed Lightning loop goes on from, given its saved batch counters: the batches completed,
    plus the one whose ``on_train_batch_end`` was running when the checkpoint was taken (Lightning counts it done).
    ``ready`` alone is wrong for a checkpoint taken in ``on_train_batch_start`` or on an exception."""
    on_batch_end = counts["ready"] == counts["started"] == counts["processed"] == counts["completed"] + 1
    return counts["completed"] + int(on_batch_end)


class PrivateCheckpointMixin(Strategy):
    """Saves and restores the DP state with Lightning's checkpoints and keeps the privacy ledgers; mixed into
    :class:`~dplightning.strategies.base.PrivateStrategyMixin`, which owns the state it saves."""

    accountant: PrivacyAccountant
    noise_source: NoiseSource
    secure_rng: bool
    target_delta: float
    noise_multiplier: float | None
    clip_thresholds: dict[str, float]
    noise_multipliers: dict[str, float]
    auxiliary_noise_multipliers: dict[str, float]
    groups: dict[str, list[str]]
    _min_sigma_used: float
    _sampler: PoissonBatchSampler | None
    _planned_accumulate: int | None
    poisson_sampling: bool

    def _init_checkpointing(self) -> None:
        self._pending_state: dict[str, Any] | None = None  # DP state loaded before setup made the groups
        # Ledgers this run appends each step to (rank 0 only): the one(s) it resumed from, and one beside each
        # folder it writes checkpoints to.
        self._ledgers: list[PrivacyLedger] = []
        self._checkpoint_dir: str | None = None  # folder of the checkpoint being loaded
        self._checkpointed_steps = 0  # accountant steps at the last checkpoint saved
        self._restored_accumulate: int | None = None  # accumulate_grad_batches of the checkpoint resumed from
        # A step's release is made and charged but its update not applied yet (see _rewind_to_step).
        self._release_unapplied = False

    def dp_state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(),
            "noise": self.noise_source.state_dict(),
            "clip_thresholds": dict(self.clip_thresholds),
            "noise_multipliers": dict(self.noise_multipliers),
            "noise_multiplier": self.noise_multiplier,
            "auxiliary_noise_multipliers": dict(self.auxiliary_noise_multipliers),
            "min_sigma_used": self._min_sigma_used,
            "ledgers": [str(ledger.path) for ledger in self._ledgers],
            "accumulate": self._planned_accumulate,
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
        self._restored_accumulate = state.get("accumulate")
        self._resume_ledgers(list(state.get("ledgers") or []))

    def _resume_ledgers(self, paths: list[str]) -> None:
        """Charge the steps the run's ledgers hold beyond the checkpoint (released after it was saved, by the run
        that wrote it or by another resumed from it) and keep appending to the ledgers found. Only when fitting:
        evaluating an older checkpoint releases no new step.

        A ledger is looked for beside the checkpoint first (a moved or copied run folder), then where it was
        written. Rank 0 reads; every rank gets the same verdict, so the ranks' accountants stay equal."""
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return
        verdict = ResumeVerdict()
        if paths and self.is_global_zero:
            verdict = read_ledgers(self.accountant, paths, self._checkpoint_dir)
        verdict = self.broadcast(verdict, src=0)
        if verdict.error is not None:
            raise DPLightningError(verdict.error)
        if not verdict.found:
            what = (
                f"privacy ledger ({', '.join(os.path.basename(p) for p in paths)}) is neither beside it nor where "
                "it was written"
                if paths
                else "names no privacy ledger (an older version's checkpoint, or one written to a remote path)"
            )
            if not self.secure_rng:
                raise DPLightningError(
                    f"the checkpoint {what}; without it a seeded resume could replay noise already used by steps "
                    "released after the checkpoint. Put the ledger back beside the checkpoint, or set "
                    "secure_rng: true (steps released after the checkpoint, if any, are then not charged)"
                )
            rank_zero_warn(
                f"[dplightning] the checkpoint {what}: steps its run released after the checkpoint, if any, are "
                "not charged. Keep the ledger beside the checkpoints it came with"
            )
        released = sum(count for _, count in verdict.orphans)
        if released and not self.secure_rng:
            raise DPLightningError(
                f"this checkpoint is {released} steps behind what its run released; resuming its seeded noise from "
                "here would replay noise already used on other batches. Resume from a checkpoint of the run's "
                "last step (trainer.save_checkpoint at its end makes one), or set secure_rng: true to go on with "
                "fresh noise (the released steps are charged)"
            )
        for event, count in verdict.orphans:
            self.accountant.record(event, count)
            self._min_sigma_used = min(self._min_sigma_used, event.noise_multiplier)
        if released:
            rank_zero_warn(
                f"[dplightning] the run that wrote this checkpoint released {released} more steps after it; they "
                f"are charged: ε = {self.accountant.epsilon(self.target_delta):.4g} so far"
            )
        self._ledgers = [PrivacyLedger(p) for p in verdict.writable] if self.is_global_zero else []

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        unsaved = self.accountant.steps - self._checkpointed_steps
        if self._ledgers and unsaved > 0 and not self.secure_rng:
            rank_zero_warn(
                f"[dplightning] the last {unsaved} steps of this seeded run are in no checkpoint, so a resume from "
                "its latest one would be refused (it would replay their noise); to go on later, save one now with "
                "trainer.save_checkpoint(...)"
            )

    def _start_ledger(self, filepath: Any) -> None:
        """Start a ledger beside a checkpoint whose folder has none of this run's (rank 0, local files only)."""
        if not self.is_global_zero:
            return
        if "://" in str(filepath):
            rank_zero_warn(
                "[dplightning] checkpoints go to a remote path, where no privacy ledger is kept: a resume from an "
                "older checkpoint will not charge the steps released after it"
            )
            return
        folder = os.path.dirname(os.path.realpath(filepath))
        if any(os.path.dirname(os.path.realpath(ledger.path)) == folder for ledger in self._ledgers):
            return
        self._ledgers.append(PrivacyLedger.start(folder, self.accountant.state_dict()["history"]))

    def _rewind_to_step(self, checkpoint: dict[str, Any]) -> None:
        """Write a checkpoint taken inside an accumulation window (a time-based, validation or on-exception
        checkpoint, one saved in ``on_train_batch_start``, or ``ModelCheckpoint`` saving again on the first
        micro-batch after a resume) as of a step boundary, where a resume restarts the sampler at a Poisson batch's
        first chunk. Left as they were, every later release of the resumed run would mix two Poisson batches.

        Nothing of an unfinished window was released (its clipped sums are not saved) and the weights, optimizer
        and accountant are the last step's: the checkpoint goes back to the window's start. A window whose release
        was made and charged but whose update was not applied (an exception between the two) is spent: the
        checkpoint goes on to its end, so its Poisson batch is never drawn again. The counters are written as a
        checkpoint taken after a finished batch, which Lightning resumes where they say."""
        k = self._planned_accumulate
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if not self.poisson_sampling or not k or k == 1 or not progress:
            return
        current = progress["current"]
        position = resume_position(current)
        # unapplied: the end of the window whose batch was in flight; else the start of the current window
        target = -(-current["started"] // k) * k if self._release_unapplied else position - position % k
        if target == position:
            return
        shift = target - position
        for scope in ("current", "total"):
            start = max(resume_position(progress[scope]) + shift, 0)
            for key in ("ready", "started", "processed", "completed"):
                progress[scope][key] = start

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        self._start_ledger(filepath)
        self._rewind_to_step(checkpoint)
        self._checkpointed_steps = self.accountant.steps
        checkpoint["dplightning"] = self.dp_state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False)
        self._checkpoint_dir = os.path.dirname(os.path.abspath(checkpoint_path))
        state = checkpoint.get("dplightning")
        if state is not None:
            if not self.groups:  # groups are made in setup: apply the state there
                self._pending_state = state
            else:
                self._apply_dp_state(state)
        return checkpoint
