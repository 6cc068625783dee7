"""TextDataModule: deterministic splits of any supported dataset, tokenised once, served as causal-LM batches."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader

from dplightning.data.collate import CausalLMCollator, TokenizedDataset
from dplightning.data.generator import generate_records
from dplightning.data.loaders import load_diabetes_csv, read_text_file
from dplightning.data.notes import render_note
from dplightning.data.schema import Record
from dplightning.errors import DPLightningError

logger = logging.getLogger(__name__)

PSEUDO_CLINICAL = "pseudo_clinical"
"""``data.dataset`` value that selects the seeded synthetic notes instead of a file."""


def _render_notes(records: list[Record], data_seed: int) -> list[str]:
    """One note per record, phrased from an rng derived from ``data_seed`` (same seed, same notes)."""
    # Offset from data_seed so the phrasing stream is not the one that drew the records or the splits.
    rng = random.Random(data_seed * 1_000_003 + 17)
    return [render_note(r, rng) for r in records]


class TextDataModule(pl.LightningDataModule):
    """Deterministic splits of short texts, tokenised once, served as padded causal-LM batches.

    Args:
        dataset: ``"pseudo_clinical"`` (seeded synthetic discharge notes), or a path to the UCI
            ``diabetic_data.csv`` (``.csv``), a ``.txt`` or a ``.jsonl`` file.
        tokenizer: ``"smollm2-135m"``, ``"tiny-llama"``/``"tiny-gpt2"`` or a local model directory; use the
            same name as the model.
        num_records: records to generate for ``pseudo_clinical``; for files, the most examples to use
            (a seeded random subset when the file has more; ``<= 0`` uses all).
        max_length: tokens per example (eos included); longer texts are truncated.
        batch_size: training batch size (the expected batch size under Poisson sampling).
        eval_batch_size: batch size of the val/test/public dataloaders.
        val_fraction: share of examples held out for validation.
        test_fraction: share held out for testing (also the non-members of membership-inference audits).
        public_fraction: share held out as *public* (non-private) data, disjoint from train/val/test, served
            by :meth:`public_dataloader`.
        data_seed: seed of the synthetic data, the note phrasing and the splits (named apart from the model's
            ``seed`` so both can be set in one LightningCLI config).
        num_workers: dataloader worker processes.
    """

    def __init__(
        self,
        dataset: str = PSEUDO_CLINICAL,
        tokenizer: str = "smollm2-135m",
        num_records: int = 2000,
        max_length: int = 128,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        public_fraction: float = 0.0,
        data_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        fractions = {"val_fraction": val_fraction, "test_fraction": test_fraction, "public_fraction": public_fraction}
        for key, value in fractions.items():
            if not 0.0 <= value < 1.0:
                raise DPLightningError(f"data.{key} = {value} is outside [0, 1); pass a fraction such as 0.1")
        if sum(fractions.values()) >= 1.0:
            raise DPLightningError(
                f"val_fraction + test_fraction + public_fraction = {sum(fractions.values()):g} leaves no training data; "
                "make their sum < 1"
            )
        if max_length < 2:
            raise DPLightningError(f"data.max_length = {max_length} is too short; pass at least 2 (e.g. 128)")
        if batch_size < 1 or eval_batch_size < 1:
            raise DPLightningError("data.batch_size and data.eval_batch_size must be >= 1; pass positive batch sizes")
        self.canaries: list[str] = []
        self.canary_repeats: list[int] = []
        self._splits: dict[str, list[str]] | None = None
        self._tokenizer: Any = None
        self.collate_fn: CausalLMCollator | None = None
        self.train_dataset: TokenizedDataset | None = None
        self.val_dataset: TokenizedDataset | None = None
        self.test_dataset: TokenizedDataset | None = None
        self.public_dataset: TokenizedDataset | None = None

    # ---------------------------------------------------------------------------------------- texts
    def _load_texts(self) -> list[str]:
        """All examples of the configured dataset, in a deterministic order."""
        hp = self.hparams
        name = str(hp.dataset)
        if name.strip().lower().replace("-", "_") == PSEUDO_CLINICAL:
            return _render_notes(generate_records(max(int(hp.num_records), 0), hp.data_seed), hp.data_seed)
        path = Path(name).expanduser()
        suffix = path.suffix.lower()
        if suffix == ".csv":
            texts = _render_notes(load_diabetes_csv(path), hp.data_seed)
        elif suffix in (".txt", ".jsonl"):
            texts = read_text_file(path)
        elif not path.exists():
            raise DPLightningError(
                f"data.dataset '{name}' is neither '{PSEUDO_CLINICAL}' nor an existing file; "
                "pass 'pseudo_clinical' or a path to a .csv, .txt or .jsonl file"
            )
        else:
            raise DPLightningError(f"data.dataset '{name}' has an unsupported type; pass a .csv, .txt or .jsonl file")
        if 0 < int(hp.num_records) < len(texts):
            logger.info("using %d of the %d examples in %s (data.num_records)", hp.num_records, len(texts), path)
            keep = sorted(random.Random(hp.data_seed).sample(range(len(texts)), int(hp.num_records)))
            texts = [texts[i] for i in keep]
        return texts

    def _build_splits(self) -> dict[str, list[str]]:
        if self._splits is not None:
            return self._splits
        hp = self.hparams
        texts = self._load_texts()
        n = len(texts)
        order = list(range(n))
        random.Random(hp.data_seed).shuffle(order)
        n_test, n_val, n_public = (round(f * n) for f in (hp.test_fraction, hp.val_fraction, hp.public_fraction))
        if hp.public_fraction > 0 and n_public == 0:
            n_public = 1
        bounds = np.cumsum([0, n_test, n_val, n_public])
        if n - bounds[-1] < 1:
            raise DPLightningError(
                f"dataset has {n} examples, too few for the requested splits; add data or raise data.num_records"
            )
        parts = {
            name: sorted(order[bounds[i] : bounds[i + 1]]) for i, name in enumerate(("test", "val", "public"))
        }
        parts["train"] = sorted(order[bounds[-1] :])
        self._splits = {name: [texts[i] for i in idx] for name, idx in parts.items()}
        return self._splits

    @property
    def train_texts(self) -> list[str]:
        """Training texts, inserted canaries (with their repeats) appended at the end."""
        canaries = [c for c, r in zip(self.canaries, self.canary_repeats) for _ in range(r)]
        return [*self._build_splits()["train"], *canaries]

    @property
    def val_texts(self) -> list[str]:
        """Validation texts."""
        return list(self._build_splits()["val"])

    @property
    def test_texts(self) -> list[str]:
        """Test texts (never trained on)."""
        return list(self._build_splits()["test"])

    @property
    def public_texts(self) -> list[str]:
        """Public (non-private) texts, disjoint from the other splits; empty when ``public_fraction`` is 0."""
        return list(self._build_splits()["public"])

    @property
    def num_train_examples(self) -> int:
        """Number of training examples, canary copies included."""
        return len(self._build_splits()["train"]) + sum(self.canary_repeats)

    # -------------------------------------------------------------------------------------- canaries
    def insert_canaries(self, canaries: list[str], repeats: int | list[int]) -> None:
        """Add each canary string ``repeats`` times (or ``repeats[i]`` times) to the training split.

        May be called before or after :meth:`setup` (after, the training split is re-tokenised); calls
        accumulate. The inserted strings are recorded in :attr:`canaries` and their counts in
        :attr:`canary_repeats`.
        """
        canaries = list(canaries)
        counts = [int(repeats)] * len(canaries) if isinstance(repeats, int) else [int(r) for r in repeats]
        if len(counts) != len(canaries):
            raise DPLightningError(
                f"got {len(canaries)} canaries but {len(counts)} repeat counts; pass one count per canary or a single int"
            )
        if any(not isinstance(c, str) or not c.strip() for c in canaries):
            raise DPLightningError("canaries must be non-empty strings; pass the secret texts to insert")
        if any(r < 1 for r in counts):
            raise DPLightningError(f"canary repeats must be >= 1, got {counts}; pass positive repeat counts")
        self.canaries.extend(canaries)
        self.canary_repeats.extend(counts)
        if self.train_dataset is not None:
            self.train_dataset = TokenizedDataset(self._tokenize(self.train_texts))

    # ---------------------------------------------------------------------------------- tokenisation
    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from dplightning.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Batch-tokenise, append eos, truncate to ``max_length`` (eos dropped when a text is truncated)."""
        if not texts:
            return []
        max_length = int(self.hparams.max_length)
        tok = self.tokenizer
        eos = tok.eos_token_id
        encoded = tok(texts, truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]
        out: list[list[int]] = []
        for ids in encoded:
            ids = list(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            out.append(ids[:max_length])
        return out

    def prepare_data(self) -> None:
        """Runs on one process per node: loads the tokenizer once (for SmolLM2 this converts the GGUF)."""
        from dplightning.models import load_tokenizer

        load_tokenizer(self.hparams.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits and tokenise all of them (once; later calls are no-ops)."""
        if self.train_dataset is not None:
            return
        splits = self._build_splits()
        pad = self.tokenizer.pad_token_id
        self.collate_fn = CausalLMCollator(pad if pad is not None else 0, self.hparams.max_length)
        self.val_dataset = TokenizedDataset(self._tokenize(splits["val"]))
        self.test_dataset = TokenizedDataset(self._tokenize(splits["test"]))
        self.public_dataset = TokenizedDataset(self._tokenize(splits["public"]))
        self.train_dataset = TokenizedDataset(self._tokenize(self.train_texts))

    # ---------------------------------------------------------------------------------- dataloaders
    def _loader(self, dataset: TokenizedDataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        assert dataset is not None and self.collate_fn is not None, "setup() builds the datasets"
        workers = int(self.hparams.num_workers)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of ``batch_size`` (a DP strategy may replace the sampler)."""
        self.setup()
        return self._loader(self.train_dataset, int(self.hparams.batch_size), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches of ``eval_batch_size``, in order."""
        self.setup()
        return self._loader(self.val_dataset, int(self.hparams.eval_batch_size), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches of ``eval_batch_size``, in order."""
        self.setup()
        return self._loader(self.test_dataset, int(self.hparams.eval_batch_size), shuffle=False)

    def public_dataloader(self) -> DataLoader:
        """Batches of the public (non-private) split, in order; needs ``public_fraction > 0``."""
        if self.hparams.public_fraction <= 0:
            raise DPLightningError("no public split: data.public_fraction is 0; set it > 0 (e.g. 0.1) to hold out public data")
        self.setup()
        return self._loader(self.public_dataset, int(self.hparams.eval_batch_size), shuffle=False)
