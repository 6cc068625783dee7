"""Field extraction: answer a fixed question about a held-out note, scored by exact match against its record.

The prompt is the note followed by the field's question (``"<note> Question: Was the patient readmitted?
Answer:"``, see :func:`~dplightning.data.notes.qa_prompt`). The model does not generate: each allowed answer of
the field is scored by the LM's log-probability of that answer followed by eos given the prompt, and the
highest-scoring one is the prediction (classification by likelihood: never an unparseable or out-of-range
answer, and no decoding settings to tune). The prediction is correct when it is the answer for the record's
value. Fields are those of :data:`~dplightning.data.notes.QA_QUESTIONS`, chosen because every note template
states them, so the answer is always recoverable from the note.

Scores are summed, not length-normalised, log-probabilities: an untrained model leans towards the shorter
answers, which is part of what fine-tuning on the question/answer lines (``data.qa_fraction``) has to fix.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dplightning.data.generator import generate_records
from dplightning.data.notes import QA_ANSWERS, QA_QUESTIONS, qa_answer, qa_prompt, render_note
from dplightning.data.schema import Record
from dplightning.errors import DPLightningError

FIELDS: tuple[str, ...] = tuple(QA_QUESTIONS)
"""The record fields asked about (all of them by default)."""

HELDOUT_SPLITS: tuple[str, ...] = ("val", "test")

ScoreFn = Callable[[Sequence[str], Sequence[str]], Any]
"""``(prompts, continuations) -> scores`` with ``scores[i][j]`` the log-probability of continuation ``j``
after prompt ``i`` (anything ``torch.as_tensor`` reads as ``[len(prompts), len(continuations)]``)."""


@dataclass(frozen=True)
class FieldResult:
    """One field's exact-match accuracy and the rate of always answering its most common value."""

    accuracy: float
    majority_rate: float
    majority_value: str
    n: int


@dataclass(frozen=True)
class ExtractionResult:
    """Accuracy and majority-class rate over all (note, field) questions, and per field.

    ``n`` is the number of notes; each note is asked every field, so the overall rates weigh fields equally.
    """

    accuracy: float
    majority_rate: float
    n: int
    per_field: dict[str, FieldResult]

    def metrics(self, prefix: str = "downstream") -> dict[str, float]:
        """Flat ``{"<prefix>/accuracy": ..., "<prefix>/<field>/accuracy": ...}`` for a logger."""
        out = {
            f"{prefix}/accuracy": self.accuracy,
            f"{prefix}/majority_rate": self.majority_rate,
            f"{prefix}/n": float(self.n),
        }
        for name, r in self.per_field.items():
            out[f"{prefix}/{name}/accuracy"] = r.accuracy
            out[f"{prefix}/{name}/majority_rate"] = r.majority_rate
        return out


def _check_fields(fields: Sequence[str] | None) -> tuple[str, ...]:
    chosen = FIELDS if fields is None else tuple(fields)
    unknown = [f for f in chosen if f not in QA_QUESTIONS]
    if unknown or not chosen:
        raise DPLightningError(f"cannot ask about fields {unknown or '[]'}; pass some of {list(FIELDS)}")
    return chosen


def score_extraction(
    examples: Sequence[tuple[str, Record]], score_fn: ScoreFn, fields: Sequence[str] | None = None
) -> ExtractionResult:
    """Ask every field of ``fields`` about every ``(note, record)`` and score the answers by exact match.

    ``score_fn`` ranks the field's allowed answers (see :data:`ScoreFn`); ties go to the earlier answer.
    The majority rate of a field is the accuracy of always giving its most common value among these examples.
    """
    chosen = _check_fields(fields)
    if not examples:
        raise DPLightningError("no notes to score; pass held-out (note, record) pairs")
    per_field: dict[str, FieldResult] = {}
    for name in chosen:
        values = list(QA_ANSWERS[name])
        prompts = [qa_prompt(note, name) for note, _ in examples]
        scores = torch.as_tensor(score_fn(prompts, [qa_answer(v, name) for v in values]), dtype=torch.float64)
        if scores.shape != (len(examples), len(values)):
            raise DPLightningError(
                f"score function returned shape {tuple(scores.shape)} for {len(examples)} prompts and "
                f"{len(values)} answers; return one score per (prompt, answer)"
            )
        truth = [str(record[name]) for _, record in examples]
        predicted = [values[j] for j in scores.argmax(dim=1).tolist()]
        majority_value, majority_count = Counter(truth).most_common(1)[0]
        per_field[name] = FieldResult(
            accuracy=sum(p == t for p, t in zip(predicted, truth)) / len(truth),
            majority_rate=majority_count / len(truth),
            majority_value=majority_value,
            n=len(truth),
        )
    return ExtractionResult(
        accuracy=sum(r.accuracy for r in per_field.values()) / len(per_field),
        majority_rate=sum(r.majority_rate for r in per_field.values()) / len(per_field),
        n=len(examples),
        per_field=per_field,
    )


def _position_limit(tokenizer: Any, max_length: int | None) -> int | None:
    if max_length is not None:
        return int(max_length)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and limit < 1_000_000 else None  # HF's "unset" is ~1e30


def _scored_tokens(
    tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str], limit: int | None
) -> list[tuple[list[int], int]]:
    """For every ``prompt + continuation`` (prompt-major): its token ids with eos appended, as in training, and
    the index of the first scored token, the end of the longest common prefix with the prompt's own ids
    (robust to BPE merges across the boundary). Texts over ``limit`` tokens lose tokens on the left: the
    start of the note, never the question or the answer."""
    eos = tokenizer.eos_token_id
    heads = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    fulls = tokenizer([p + c for p in prompts for c in continuations], add_special_tokens=True)["input_ids"]
    out = []
    for k, full in enumerate(fulls):
        head = heads[k // len(continuations)]
        ids = [*full, eos] if eos is not None else list(full)
        start = 0
        while start < min(len(full), len(head)) and full[start] == head[start]:
            start += 1
        if limit is not None and len(ids) > limit:
            start -= len(ids) - limit
            ids = ids[len(ids) - limit :]
        out.append((ids, max(start, 1)))  # the first token has nothing to predict it
    return out


def _causal_lm(model: Any) -> Any | None:
    """The Hugging Face causal LM behind ``model`` (itself, or ``DPLoRAModule``'s ``.model``), if it has one:
    only such a model takes ``past_key_values``, which the prefix-sharing path needs."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "config") and callable(candidate):
            return candidate
    return None


def _padded(seqs: Sequence[Sequence[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask ``[len(seqs), longest]``."""
    width = max(len(t) for t in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, tokens in enumerate(seqs):
        ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attn[r, : len(tokens)] = 1
    return ids.to(device), attn.to(device)


def _summed_logp(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of ``targets[r, t]`` under ``logits[r, t]`` where ``scored``."""
    row, pos = scored.nonzero(as_tuple=True)
    # Only the answer positions need a softmax; taking it over [B, T, V] would cost T times more.
    logp = torch.log_softmax(logits[row, pos].double(), dim=-1)
    picked = logp.gather(-1, targets[row, pos][:, None]).squeeze(-1)
    return torch.zeros(len(scored), dtype=torch.float64, device=logits.device).index_add_(0, row, picked)


def _full_scores(
    model: Any, rows: Sequence[tuple[list[int], int]], batch_size: int, pad: int, device: Any
) -> torch.Tensor:
    """Every row run whole: one forward per ``batch_size`` rows of similar length."""
    flat = torch.zeros(len(rows), dtype=torch.float64)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths pad little
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        ids, attn = _padded([rows[i][0] for i in chunk], pad, device)
        scored = torch.zeros_like(attn, dtype=torch.bool)
        for r, i in enumerate(chunk):
            tokens, start = rows[i]
            scored[r, start : len(tokens)] = True
        out = model(ids, attn)
        logits = getattr(out, "logits", out)
        flat[chunk] = _summed_logp(logits[:, :-1], ids[:, 1:], scored[:, 1:]).cpu()
    return flat


def _prefix_shared_scores(
    lm: Any, rows: Sequence[tuple[list[int], int]], per_prompt: int, batch_size: int, pad: int, device: Any
) -> torch.Tensor:
    """The same scores as :func:`_full_scores`, computing each prompt's shared prefix once.

    A prompt's rows (one per continuation) agree on their first ``min(start) - 1`` tokens; that prefix runs once
    with the KV cache kept, the cache is repeated for the prompt's continuations, and only the suffixes (the
    answer, eos and a token or two of the boundary) run per row. Prompts are right-padded, so each suffix gets
    explicit position ids and an attention mask that skips the padding in the cache. About ``per_prompt`` times
    fewer tokens than running every row whole.
    """
    from transformers import DynamicCache

    n_prompts = len(rows) // per_prompt
    flat = torch.zeros(len(rows), dtype=torch.float64)
    prompts_per_batch = max(1, batch_size // per_prompt)
    heads = [min(rows[k * per_prompt + j][1] for j in range(per_prompt)) - 1 for k in range(n_prompts)]
    order = sorted(range(n_prompts), key=lambda k: heads[k])
    for b in range(0, n_prompts, prompts_per_batch):
        chunk = order[b : b + prompts_per_batch]
        prefix_ids, prefix_attn = _padded([rows[k * per_prompt][0][: heads[k]] for k in chunk], pad, device)
        cache = DynamicCache()
        lm(
            input_ids=prefix_ids,
            attention_mask=prefix_attn,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(per_prompt)
        members = [k * per_prompt + j for k in chunk for j in range(per_prompt)]
        suffixes = [rows[i][0][heads[i // per_prompt] :] for i in members]
        ids, attn = _padded(suffixes, pad, device)
        head = torch.tensor([heads[i // per_prompt] for i in members], device=device)
        positions = head[:, None] + torch.arange(ids.shape[1], device=device)[None, :]
        full_attn = torch.cat([prefix_attn.repeat_interleave(per_prompt, dim=0), attn], dim=1)
        out = lm(input_ids=ids, attention_mask=full_attn, position_ids=positions, past_key_values=cache)
        scored = torch.zeros_like(attn, dtype=torch.bool)
        for r, i in enumerate(members):
            tokens, start = rows[i]
            scored[r, start - heads[i // per_prompt] : len(tokens) - heads[i // per_prompt]] = True
        # suffix logit t predicts suffix token t + 1; the first scored token (start) is predicted by suffix
        # position start - 1 - head >= 0, so every scored token is predicted inside this pass
        flat[members] = _summed_logp(out.logits[:, :-1], ids[:, 1:], scored[:, 1:]).cpu()
        del cache
    return flat


def lm_scorer(model: Any, tokenizer: Any, batch_size: int = 16, max_length: int | None = None) -> ScoreFn:
    """A :data:`ScoreFn` backed by a causal LM: summed log-probability of each continuation's tokens and eos.

    ``model(input_ids, attention_mask)`` returns logits ``[B, T, V]`` (``DPLoRAModule``) or an output with
    ``.logits`` (a Hugging Face model). ``max_length`` caps the tokens per scored text (default: the
    tokenizer's ``model_max_length``); longer texts are cut on the left. When the model is (or wraps, as
    ``DPLoRAModule`` does) a Hugging Face causal LM and no text was cut, each prompt is run once and only the
    continuations per answer (:func:`_prefix_shared_scores`); otherwise every (prompt, answer) text is run whole.
    """
    if batch_size < 1:
        raise DPLightningError(f"batch_size must be >= 1, got {batch_size}; pass a positive batch size")
    limit = _position_limit(tokenizer, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def score(prompts: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        rows = _scored_tokens(tokenizer, prompts, continuations, limit)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        lm = _causal_lm(model)
        # A row cut on the left no longer shares its prompt's prefix; rows at exactly the limit may have been.
        uncut = all((limit is None or len(ids) < limit) and start >= 2 for ids, start in rows)
        try:
            if lm is not None and uncut:
                flat = _prefix_shared_scores(lm, rows, len(continuations), batch_size, pad, device)
            else:
                flat = _full_scores(model, rows, batch_size, pad, device)
        finally:
            model.train(was_training)
        return flat.view(len(prompts), len(continuations))

    return score


# Fresh synthetic notes come from a seed stream of their own, so they are independent of the data's records.
_FRESH_SEED_SCALE, _FRESH_SEED_OFFSET = 1_000_003, 101


def heldout_examples(
    datamodule: Any, split: str = "test", num_notes: int | None = None
) -> list[tuple[str, Record]]:
    """``(note, record)`` pairs never trained on: the notes of ``split`` (``"val"`` or ``"test"``), in order.

    ``num_notes`` takes the first that many; when the split is smaller and the dataset is the synthetic
    ``pseudo_clinical`` generator, the rest are fresh notes drawn from the same generator and renderer under
    a seed derived from ``data_seed`` (same distribution, in no split). For a CSV, a smaller split is an error.
    """
    if split not in HELDOUT_SPLITS:
        raise DPLightningError(f"split '{split}' is not held out; pass one of {list(HELDOUT_SPLITS)}")
    if num_notes is not None and num_notes < 1:
        raise DPLightningError(f"num_notes must be >= 1 or None (the whole split), got {num_notes}")
    examples = list(zip(getattr(datamodule, f"{split}_texts"), datamodule.split_records(split)))
    # a TextDataModule says whether its held-out metrics are on; another data module is its caller's concern
    check = getattr(datamodule, "check_heldout_metrics", None)
    if check is not None:
        check("downstream accuracy")
    if num_notes is None or num_notes <= len(examples):
        examples = examples[:num_notes]
    elif getattr(datamodule, "is_synthetic", False):
        seed = int(datamodule.hparams.data_seed) * _FRESH_SEED_SCALE + _FRESH_SEED_OFFSET
        rng = random.Random(seed)
        examples += [(render_note(r, rng), r) for r in generate_records(num_notes - len(examples), seed)]
    else:
        raise DPLightningError(
            f"the {split} split has {len(examples)} notes, fewer than num_notes = {num_notes}; "
            f"raise data.{split}_fraction or lower num_notes"
        )
    if not examples:
        raise DPLightningError(f"the {split} split is empty; set data.{split}_fraction > 0 or pass num_notes")
    return examples


def evaluate_field_extraction(
    model: Any,
    datamodule: Any,
    fields: Sequence[str] | None = None,
    split: str = "test",
    num_notes: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
) -> ExtractionResult:
    """Score ``model`` on the held-out notes of ``datamodule`` (a ``TextDataModule`` with records).

    See :func:`heldout_examples` for ``split`` / ``num_notes`` and :func:`lm_scorer` for the scoring. These
    notes are held out: the result is not covered by the training's ε if they are private.
    """
    examples = heldout_examples(datamodule, split, num_notes)
    return score_extraction(examples, lm_scorer(model, datamodule.tokenizer, batch_size, max_length), fields)
