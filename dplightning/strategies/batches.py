"""What a private training batch is made of: a fixed padded width (so one example's arithmetic never depends on
the others'), an empty Poisson batch that still collates, and the batch size of any batch structure."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from dplightning.data.collate import CausalLMCollator
from dplightning.errors import DPLightningError


def fixed_width(collate: Any, module: Any) -> Any:
    """``collate``, but a :class:`CausalLMCollator` pads to its ``"fixed"`` width (``max_length + 1``), which must
    fit ``module``'s model (a model with learned absolute positions, GPT-2, would fail at the first step).

    With the longest note's width every example's arithmetic (attention over the padded width) depends on the
    other notes' lengths, and at exactly ``max_length`` a batch of truncated notes has an all-ones mask, which
    Hugging Face models turn into another attention path: either way adding or removing one record moved the
    others' gradients in their low bits (measured: a few 1e-3 of C in bf16, 1e-7 in fp32) and the sensitivity
    exceeded C. The fixed width costs the padding's compute; a collate function of your own should pad to a
    fixed width, with a padding column, too."""
    if not isinstance(collate, CausalLMCollator):
        return collate
    config = getattr(getattr(module, "model", None), "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    width = collate.max_length + 1
    if isinstance(limit, int) and width > limit:
        raise DPLightningError(
            f"private training pads every batch to data.max_length + 1 = {width} positions (a fixed width with a "
            f"padding column keeps each example's arithmetic independent of the others), but the model has "
            f"{limit}; set data.max_length to at most {limit - 1}"
        )
    if collate.pad_to == "fixed":
        return collate
    fixed = copy.copy(collate)  # keeps a subclass's behaviour
    fixed.pad_to = "fixed"
    return fixed


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
            batch = self.collate_fn(items)
            if batch is None:
                # Lightning skips a None batch without a step: a skip decided by the records is not private.
                raise DPLightningError(
                    "the collate function returned None, which makes Lightning skip the batch; a private run "
                    "trains every Poisson batch: collate every batch (filter records before training, not per batch)"
                )
            return batch
        template = self.collate_fn([self.dataset[0]])
        return apply_to_collection(template, Tensor, lambda t: t[:0])
