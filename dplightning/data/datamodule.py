"""TextDataModule: deterministic splits of any supported dataset, tokenised once, served as causal-LM batches."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
from lightning.fabric.utilities.data import AttributeDict
from torch.utils.data import DataLoader

from dplightning.data.collate import CausalLMCollator, TokenizedDataset
from dplightning.data.generator import generate_records
from dplightning.data.loaders import load_diabetes_csv, read_text_file
from dplightning.data.notes import QA_QUESTIONS, append_qa, render_note
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


def _append_qa_lines(
    notes: list[str], records: list[Record], qa_fraction: float, data_seed: int
) -> list[str]:
    """``notes`` where a seeded ``qa_fraction`` share gets one question/answer line about its own record.

    Every note draws its coin and its field whatever ``qa_fraction`` is, so raising the fraction only adds
    lines (the notes that had one keep the same one); one random field per note keeps each training text in
    the shape of exactly one held-out prompt (note, question, answer, eos).
    """
    # Its own stream: the records, the phrasing and the splits stay exactly as without QA lines.
    rng = random.Random(data_seed * 1_000_003 + 29)
    fields = list(QA_QUESTIONS)
    out = []
    for note, record in zip(notes, records):
        coin, field = rng.random(), rng.choice(fields)
        out.append(append_qa(note, record, field) if coin < qa_fraction else note)
    return out


def check_data_settings(
    *,
    val_fraction: float,
    test_fraction: float,
    public_fraction: float,
    qa_fraction: float,
    max_length: int,
    batch_size: int,
    eval_batch_size: int,
) -> None:
    """Every check of a :class:`TextDataModule` configuration that needs no data, in order: the held-out shares
    (each in [0, 1), together < 1), the QA share, the token length, the batch sizes."""
    fractions = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "public_fraction": public_fraction,
    }
    for key, value in fractions.items():
        if not 0.0 <= value < 1.0:
            raise DPLightningError(f"data.{key} = {value} is outside [0, 1); pass a fraction such as 0.1")
    if sum(fractions.values()) >= 1.0:
        raise DPLightningError(
            f"val_fraction + test_fraction + public_fraction = {sum(fractions.values()):g} leaves no training data; "
            "make their sum < 1"
        )
    if not 0.0 <= qa_fraction <= 1.0:
        raise DPLightningError(
            f"data.qa_fraction = {qa_fraction} is outside [0, 1]; pass a share such as 1.0"
        )
    if max_length < 2:
        raise DPLightningError(f"data.max_length = {max_length} is too short; pass at least 2 (e.g. 128)")
    if batch_size < 1 or eval_batch_size < 1:
        raise DPLightningError(
            "data.batch_size and data.eval_batch_size must be >= 1; pass positive batch sizes"
        )


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
        qa_fraction: share of training notes (a seeded choice) that get one downstream question/answer line
            appended, e.g. "Question: Was the patient readmitted? Answer: no", about a seeded random field of
            :data:`~dplightning.data.notes.QA_QUESTIONS`; validation/test/public notes never get one. Needs a
            record-backed dataset (``pseudo_clinical`` or the CSV). 0 leaves the data exactly as without it.
        heldout_metrics: whether metrics are computed on the held-out splits (validation and test loaders,
            downstream accuracy). Those splits are records of the same data, and their metrics leave the process
            (logs, TensorBoard, the summary) without being covered by ε. ``None`` (default): on for the seeded
            generator (``pseudo_clinical`` holds nothing private), off for a data file — whatever the strategy,
            since the same data module may later serve a plain evaluation run: validation is then skipped (one
            warning) and test metrics are refused. ``True`` turns them on (not covered by ε), ``False`` off.
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
        qa_fraction: float = 0.0,
        heldout_metrics: bool | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_data_settings(
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            public_fraction=public_fraction,
            qa_fraction=qa_fraction,
            max_length=max_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
        )
        self.canaries: list[str] = []
        self.canary_repeats: list[int] = []
        self._splits: dict[str, list[str]] | None = None
        self._split_records: dict[str, list[Record]] | None = None
        self._tokenizer: Any = None
        self.collate_fn: CausalLMCollator | None = None
        self.train_dataset: TokenizedDataset | None = None
        self.val_dataset: TokenizedDataset | None = None
        self.test_dataset: TokenizedDataset | None = None
        self.public_dataset: TokenizedDataset | None = None

    @property
    def _arguments(self) -> AttributeDict:
        """The constructor's arguments, as ``save_hyperparameters`` keeps them (Lightning types ``hparams`` as any
        mutable mapping; here it is always its attribute dict)."""
        return cast(AttributeDict, self.hparams)

    # ---------------------------------------------------------------------------------------- texts
    @property
    def is_synthetic(self) -> bool:
        """Whether the dataset is the seeded generator (``pseudo_clinical``), not a file."""
        return str(self._arguments.dataset).strip().lower().replace("-", "_") == PSEUDO_CLINICAL

    def _load_examples(self) -> tuple[list[str], list[Record] | None]:
        """All examples of the configured dataset in a deterministic order, and the record behind each one
        (``None`` for text files, which have no records)."""
        hp = self._arguments
        name = str(hp.dataset)
        records: list[Record] | None = None
        if self.is_synthetic:
            records = generate_records(max(int(hp.num_records), 0), hp.data_seed)
            return _render_notes(records, hp.data_seed), records
        path = Path(name).expanduser()
        suffix = path.suffix.lower()
        if suffix == ".csv":
            records = load_diabetes_csv(path)
            texts = _render_notes(records, hp.data_seed)
        elif suffix in (".txt", ".jsonl"):
            texts = read_text_file(path)
        elif not path.exists():
            raise DPLightningError(
                f"data.dataset '{name}' is neither '{PSEUDO_CLINICAL}' nor an existing file; "
                "pass 'pseudo_clinical' or a path to a .csv, .txt or .jsonl file"
            )
        else:
            raise DPLightningError(
                f"data.dataset '{name}' has an unsupported type; pass a .csv, .txt or .jsonl file"
            )
        if 0 < int(hp.num_records) < len(texts):
            logger.info(
                "using %d of the %d examples in %s (data.num_records)", hp.num_records, len(texts), path
            )
            keep = sorted(random.Random(hp.data_seed).sample(range(len(texts)), int(hp.num_records)))
            texts = [texts[i] for i in keep]
            records = None if records is None else [records[i] for i in keep]
        return texts, records

    def _build_splits(self) -> dict[str, list[str]]:
        if self._splits is not None:
            return self._splits
        hp = self._arguments
        texts, records = self._load_examples()
        if hp.qa_fraction > 0 and records is None:
            raise DPLightningError(
                f"data.qa_fraction needs notes rendered from records, but '{hp.dataset}' is a text file; "
                "use dataset 'pseudo_clinical' or diabetic_data.csv, or set data.qa_fraction to 0"
            )
        n = len(texts)
        order = list(range(n))
        random.Random(hp.data_seed).shuffle(order)
        n_test, n_val, n_public = (
            round(f * n) for f in (hp.test_fraction, hp.val_fraction, hp.public_fraction)
        )
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
        if records is not None:
            self._split_records = {name: [records[i] for i in idx] for name, idx in parts.items()}
            if hp.qa_fraction > 0:
                self._splits["train"] = _append_qa_lines(
                    self._splits["train"], self._split_records["train"], float(hp.qa_fraction), hp.data_seed
                )
        return self._splits

    def split_records(self, split: str) -> list[Record]:
        """The records behind the notes of ``split`` (``"train"``, ``"val"``, ``"test"`` or ``"public"``), in
        the order of that split's texts (inserted canaries have none)."""
        self._build_splits()
        if self._split_records is None:
            raise DPLightningError(
                f"data.dataset '{self._arguments.dataset}' is a text file without records; "
                "use 'pseudo_clinical' or diabetic_data.csv for record-level tasks"
            )
        if split not in self._split_records:
            raise DPLightningError(f"unknown split '{split}'; pass one of {sorted(self._split_records)}")
        return list(self._split_records[split])

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

            self._tokenizer = load_tokenizer(self._arguments.tokenizer)
        return self._tokenizer

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Batch-tokenise, append eos, truncate to ``max_length`` (eos dropped when a text is truncated)."""
        if not texts:
            return []
        max_length = int(self._arguments.max_length)
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

        load_tokenizer(self._arguments.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits and tokenise all of them (once; later calls are no-ops)."""
        if self.train_dataset is not None:
            return
        splits = self._build_splits()
        pad = self.tokenizer.pad_token_id
        self.collate_fn = CausalLMCollator(pad if pad is not None else 0, self._arguments.max_length)
        self.val_dataset = TokenizedDataset(self._tokenize(splits["val"]))
        self.test_dataset = TokenizedDataset(self._tokenize(splits["test"]))
        self.public_dataset = TokenizedDataset(self._tokenize(splits["public"]))
        self.train_dataset = TokenizedDataset(self._tokenize(self.train_texts))
        if self._arguments.qa_fraction > 0:
            self._warn_truncated_answers(splits["train"], self.train_dataset.input_ids)

    def _warn_truncated_answers(self, texts: list[str], input_ids: list[list[int]]) -> None:
        """Warn when max_length cuts appended answers off: the model would never see them."""
        eos = self.tokenizer.eos_token_id
        if eos is None:  # no way to tell a truncated text from a whole one
            return
        # _tokenize keeps eos only on texts that fit; notes never contain "Question: " themselves.
        if any("Question: " in text and ids[-1] != eos for text, ids in zip(texts, input_ids)):
            # no count: how many private records are long is a statistic of the data, not a setting
            logger.warning(
                "training texts with a question/answer line are longer than data.max_length = %d and lose their "
                "answer; raise data.max_length",
                self._arguments.max_length,
            )

    # ---------------------------------------------------------------------------------- dataloaders
    def _loader(self, dataset: TokenizedDataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        assert dataset is not None and self.collate_fn is not None, "setup() builds the datasets"
        workers = int(self._arguments.num_workers)
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
        return self._loader(self.train_dataset, int(self._arguments.batch_size), shuffle=True)

    @property
    def heldout_metrics_on(self) -> bool:
        """Whether validation/test metrics are computed (see ``heldout_metrics``)."""
        flag = self._arguments.get("heldout_metrics")
        return self.is_synthetic if flag is None else bool(flag)

    def _heldout_metrics_off(self, what: str) -> str:
        """Why ``what`` (metrics on held-out records) is off, and the fix."""
        return (
            f"{what} on held-out records of '{Path(str(self._arguments.dataset)).name}' would leave the process "
            "without being covered by ε; set data.heldout_metrics: true to compute them anyway"
        )

    def check_heldout_metrics(self, what: str) -> None:
        """Raise when held-out metrics are off: ``what`` names the metrics asked for."""
        if not self.heldout_metrics_on:
            raise DPLightningError(self._heldout_metrics_off(what))

    def val_dataloader(self) -> DataLoader:
        """Validation batches of ``eval_batch_size``, in order; none when held-out metrics are off."""
        self.setup()
        if not self.heldout_metrics_on:
            logger.warning("validation is off: %s", self._heldout_metrics_off("validation metrics"))
            return self._loader(TokenizedDataset([]), int(self._arguments.eval_batch_size), shuffle=False)
        return self._loader(self.val_dataset, int(self._arguments.eval_batch_size), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches of ``eval_batch_size``, in order; refused when held-out metrics are off."""
        self.setup()
        self.check_heldout_metrics("test metrics")
        return self._loader(self.test_dataset, int(self._arguments.eval_batch_size), shuffle=False)

    def public_dataloader(self) -> DataLoader:
        """Batches of the public (non-private) split, in order; needs ``public_fraction > 0``."""
        if self._arguments.public_fraction <= 0:
            raise DPLightningError(
                "no public split: data.public_fraction is 0; set it > 0 (e.g. 0.1) to hold out public data"
            )
        self.setup()
        return self._loader(self.public_dataset, int(self._arguments.eval_batch_size), shuffle=False)
