"""DP-SGD across processes: :class:`~dplightning.strategies.dpsgd.DPSGDMixin` on Lightning's ``DDPStrategy``."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from typing_extensions import override

from dplightning.checkpoint_io import AtomicCheckpointIO
from dplightning.privacy.accounting import AccountantKind
from dplightning.privacy.clipping import ClippingMode
from dplightning.privacy.per_example_grads import LossReduction
from dplightning.strategies.dpsgd import DPSGDMixin
from dplightning.strategies.settings import PrivacySettings


class DDPDPSGDStrategy(DPSGDMixin, DDPStrategy):
    """DP-SGD across processes (Lightning DDP launcher, any backend; ``gloo`` on CPU).

    With a ``seed`` every rank draws the same global Poisson mask and keeps its shard ``index % world == rank``;
    with the OS CSPRNG (no seed, the default) each rank draws the inclusions of its own shard. Either way the union
    of the ranks' batches is a single-process Poisson batch. The model is *not* wrapped in
    ``DistributedDataParallel``: each rank clips its own examples, the clipped sums are all-reduced once per
    step, and the same noise is added on every rank after the reduction (noise enters once in total: seeded,
    every rank draws it alike; from the CSPRNG, rank 0 draws it and broadcasts). All ranks apply the same update.

    Arguments as for :class:`~dplightning.strategies.dpsgd.DPSGDStrategy` (Gaussian noise only), plus
    ``process_group_backend`` and ``start_method`` as for Lightning's ``DDPStrategy``.
    """

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
        process_group_backend: str | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        checkpoint_io: CheckpointIO | None = None,
    ) -> None:
        super().__init__(
            process_group_backend=process_group_backend,
            start_method=start_method,
            checkpoint_io=checkpoint_io or AtomicCheckpointIO(),
        )
        self._init_dpsgd(
            PrivacySettings.from_arguments(locals()),
            max_grad_norm=max_grad_norm,
            clipping=clipping,
            loss_reduction=loss_reduction,
        )

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._shard = (self.global_rank, self.world_size)
        super().setup(trainer)

    @override
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:  # type: ignore[override]
        # Not the DistributedDataParallel that DDPStrategy's version returns: clipped sums are reduced explicitly.
        return model

    @override
    def _sync_initial_params(self) -> None:
        for p in self._attached_module.parameters():
            torch.distributed.broadcast(p.data, src=0)

    @override
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

    @override
    def _add_noise(self, units: Tensor, std: float) -> Tensor:
        released = super()._add_noise(units, std)
        if self.secure_rng:  # CSPRNG draws differ per rank; the reduced sums agree, so take rank 0's release
            torch.distributed.broadcast(released, src=0)
        return released


__all__ = ["DDPDPSGDStrategy"]
