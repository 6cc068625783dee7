"""Tokenised examples as a torch dataset, and their padding into causal-LM batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset


class TokenizedDataset(Dataset):
    """Token id sequences; item ``i`` is ``{"input_ids": list[int]}``."""

    def __init__(self, input_ids: Sequence[Sequence[int]]) -> None:
        self.input_ids = [list(ids) for ids in input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[index]}


PadTo = Literal["longest", "max_length", "fixed"]


class CausalLMCollator:
    """Pads a list of ``{"input_ids": ...}`` items into a causal-LM batch.

    Returns ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, T]`` (long), padding on the right with
    ``pad_token_id``, attention mask 0 and labels ``-100`` on padding; items longer than ``max_length`` are
    truncated. An empty list gives three ``(0, 0)`` tensors. Picklable (worker processes).

    ``pad_to="longest"`` (default) makes ``T`` the longest item of the batch; ``"max_length"`` always pads to
    ``max_length``. Both give the same per-example losses up to float rounding: padding is on the right, so
    under the causal mask no real token attends to it, positions of real tokens do not move, and padded
    positions are never scored. Padding to the longest item only skips work on padding (a batch of short
    notes costs what its longest note costs, not ``max_length``).

    ``"fixed"`` (what private training uses) pads to ``max_length + 1``: a width no note sets, with a padding
    column in every row, so the attention mask is never all ones. Hugging Face models drop an all-ones mask and
    take a different (``is_causal``) attention path, so with ``"max_length"`` a batch of truncated notes and the
    same batch plus one short note would compute everyone's attention differently.
    """

    def __init__(self, pad_token_id: int, max_length: int, pad_to: PadTo = "longest") -> None:
        if pad_to not in ("longest", "max_length", "fixed"):
            raise ValueError(f"pad_to must be 'longest', 'max_length' or 'fixed', got {pad_to!r}")
        self.pad_token_id = int(pad_token_id)
        self.max_length = int(max_length)
        self.pad_to: PadTo = pad_to

    def __call__(self, items: Sequence[Mapping[str, Sequence[int] | Tensor]]) -> dict[str, Tensor]:
        if len(items) == 0:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone()}
        seqs = [
            torch.as_tensor(item["input_ids"], dtype=torch.long).reshape(-1)[: self.max_length]
            for item in items
        ]
        widths = {"max_length": self.max_length, "fixed": self.max_length + 1}
        width = widths.get(self.pad_to) or max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = seq
            attention_mask[row, : len(seq)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
