"""Text data: a seeded pseudo-clinical corpus (Diabetes130-US schema), the real UCI CSV, ``.txt``/``.jsonl`` files.

:class:`TextDataModule` turns any of these into deterministic train / val / test (and optional public)
splits of short texts, tokenises them once in :meth:`TextDataModule.setup`, and serves padded causal-LM
batches. The training dataloader is a plain :class:`~torch.utils.data.DataLoader` so a DP strategy can swap
its sampler for a Poisson batch sampler; its ``collate_fn`` accepts an empty list.

Modules: :mod:`.schema` (record fields), :mod:`.generator` (synthetic records), :mod:`.notes` (record →
note text), :mod:`.loaders` (files on disk), :mod:`.collate` (batches), :mod:`.datamodule`.
Everything public is re-exported here, so ``from dplightning.data import X`` is the import to use.
"""

from dplightning.data.collate import CausalLMCollator, TokenizedDataset
from dplightning.data.datamodule import PSEUDO_CLINICAL, TextDataModule
from dplightning.data.generator import generate_records
from dplightning.data.loaders import CSV_COLUMNS, icd9_group, load_diabetes_csv, read_text_file
from dplightning.data.notes import NOTE_TEMPLATES, render_note

# The per-field value lists stay in dplightning.data.schema; the package exports the schema itself.
from dplightning.data.schema import SCHEMA_FIELDS, Record

__all__ = [
    "CSV_COLUMNS",
    "NOTE_TEMPLATES",
    "PSEUDO_CLINICAL",
    "SCHEMA_FIELDS",
    "CausalLMCollator",
    "Record",
    "TextDataModule",
    "TokenizedDataset",
    "generate_records",
    "icd9_group",
    "load_diabetes_csv",
    "read_text_file",
    "render_note",
]
