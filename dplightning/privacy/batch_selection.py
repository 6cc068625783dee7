"""Poisson batch selection: every example joins a logical batch independently with probability ``q``.

The privacy analysis of subsampled mechanisms (and dp-accounting's ``PoissonSampledDpEvent``) assumes this
sampling; fixed-size shuffled batches are only an approximation of it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def _batch_seed(seed: int, epoch: int, index: int) -> int:
    # A counter-based seed: batch (epoch, index) is the same wherever iteration starts (resume-safe).
    digest = hashlib.sha256(f"dplightning-poisson:{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields index lists whose size is ``Binomial(N, q)``; empty lists are yielded too (a noise-only step).

    With ``micro_batches = k`` each logical (Poisson) batch is split into ``k`` consecutive chunks, so a trainer
    that accumulates ``k`` micro-batches per optimizer step sees one Poisson batch per step.

    Args:
        num_examples: dataset size ``N``.
        sample_rate: inclusion probability ``q`` in (0, 1].
        num_batches: logical batches per epoch; default ``round(1 / q)`` (one expected pass over the data).
        seed: base seed; batch ``(epoch, i)`` is a pure function of ``(seed, epoch, i)``.
        micro_batches: chunks per logical batch (gradient accumulation).
        secure_rng: draw inclusion from the OS CSPRNG instead (not reproducible).
        rank, world_size: under data parallelism every rank draws the same global mask (shared seed) and keeps
            the indices ``i % world_size == rank``; the union over ranks is the single-process batch.
    """

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        num_batches: int | None = None,
        seed: int = 0,
        micro_batches: int = 1,
        secure_rng: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_examples <= 0:
            raise ValueError("PoissonBatchSampler needs a non-empty dataset")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_examples = num_examples
        self.sample_rate = sample_rate
        self.num_batches = num_batches if num_batches is not None else max(1, round(1.0 / sample_rate))
        self.seed = seed
        self.micro_batches = micro_batches
        self.secure_rng = secure_rng
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0  # logical batches of the current epoch already consumed (set on resume)

    @property
    def sampler(self) -> PoissonBatchSampler:
        """Itself. Lightning calls ``set_epoch`` only on ``loader.sampler`` and ``loader.batch_sampler.sampler``;
        without this every epoch would replay epoch 0's batches, and reused batches void the Poisson-sampling
        amplification the accountant assumes."""
        return self

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = 0
        self.epoch = epoch

    def __len__(self) -> int:
        # The full epoch, also when resuming mid-epoch: Lightning counts the batches already done itself (its
        # batch index continues from the checkpoint), so reporting only the remainder would end the epoch early.
        return self.num_batches * self.micro_batches

    def logical_batch(self, index: int) -> np.ndarray:
        """This rank's indices of logical batch ``index`` of the current epoch (all ranks: ``Binomial(N, q)``)."""
        if self.secure_rng:
            uniform = np.frombuffer(os.urandom(8 * self.num_examples), dtype=np.uint64) / np.float64(2**64)
        else:
            uniform = np.random.default_rng(_batch_seed(self.seed, self.epoch, index)).random(
                self.num_examples
            )
        chosen = np.flatnonzero(uniform < self.sample_rate)
        return chosen[chosen % self.world_size == self.rank] if self.world_size > 1 else chosen

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start_batch = self.start_batch, 0
        for index in range(start, self.num_batches):
            for chunk in np.array_split(self.logical_batch(index), self.micro_batches):
                yield chunk.tolist()
