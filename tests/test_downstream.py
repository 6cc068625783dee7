"""Downstream field extraction: QA lines in the training data, held-out prompts, scoring, the callback."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from dplightning.callbacks import DownstreamAccuracy
from dplightning.data import NOTE_TEMPLATES, TextDataModule, generate_records, render_note
from dplightning.data.notes import QA_ANSWERS, QA_QUESTIONS, qa_answer, qa_prompt
from dplightning.errors import DPLightningError
from dplightning.evaluation import FIELDS, heldout_examples, lm_scorer, score_extraction

TINY = "tiny-llama"

# How each value is worded in the notes (every template, every phrasing), lower case. A reader that knows
# only these phrases recovers the field from the note alone: the task is answerable.
_WORDING = {
    "readmitted": {
        "NO": ("no readmission recorded", "not readmitted", "readmitted no"),
        "<30": ("readmitted within 30 days", "readmitted in under 30 days", "readmitted <30"),
        ">30": ("readmitted after more than 30 days", "readmitted beyond 30 days", "readmitted >30"),
    },
    "insulin": {
        "No": ("not on insulin", "no insulin prescribed", "insulin no ", "insulin none"),
        "Steady": ("insulin dose unchanged", "insulin continued at the same dose", "insulin steady"),
        "Up": ("insulin dose increased", "insulin titrated up", "insulin up"),
        "Down": ("insulin dose reduced", "insulin titrated down", "insulin down"),
    },
}


def read_field(note: str, field: str) -> str:
    """The value of ``field`` stated in ``note`` (exactly one value must be stated)."""
    text = note.lower() + " "
    found = {value for value, phrases in _WORDING[field].items() if any(p in text for p in phrases)}
    assert len(found) == 1, (field, found, note)
    return found.pop()


def reader_score_fn(prompts: Sequence[str], continuations: Sequence[str]) -> list[list[float]]:
    """A stub "model": reads the answer from the note in the prompt; 0 for it, -1 for the other answers."""
    out = []
    for prompt in prompts:
        note, question = re.fullmatch(r"(.*) Question: (.*) Answer:", prompt).groups()
        field = next(f for f, q in QA_QUESTIONS.items() if q == question)
        right = qa_answer(read_field(note, field), field)
        out.append([0.0 if c == right else -1.0 for c in continuations])
    return out


def _data(**kw: object) -> TextDataModule:
    return TextDataModule(tokenizer=TINY, **{"num_records": 300, "data_seed": 5, "max_length": 96, **kw})


# ------------------------------------------------------------------------------------------- the task
def test_every_template_states_every_asked_field() -> None:
    records = generate_records(400, seed=3)
    for i in range(len(NOTE_TEMPLATES)):
        rng = random.Random(i)
        for record in records:
            note = render_note(record, rng, template=i)
            for field in FIELDS:
                assert read_field(note, field) == record[field], (i, field, note)


def test_answers_cover_the_schema_and_are_prefix_free() -> None:
    from dplightning.data import SCHEMA_FIELDS

    for field in FIELDS:
        assert set(QA_ANSWERS[field]) == set(SCHEMA_FIELDS[field])
        answers = list(QA_ANSWERS[field].values())
        assert not any(a != b and b.startswith(a) for a in answers for b in answers)


def test_reader_stub_scores_100_percent_and_majority_rate_is_right() -> None:
    examples = heldout_examples(_data(), "test")
    result = score_extraction(examples, reader_score_fn)
    assert result.accuracy == 1.0 and result.n == len(examples) == 30
    assert set(result.per_field) == set(FIELDS)
    for field, r in result.per_field.items():
        counts = Counter(record[field] for _, record in examples)
        assert r.majority_value == counts.most_common(1)[0][0]
        assert r.majority_rate == pytest.approx(counts.most_common(1)[0][1] / len(examples))
        assert r.accuracy == 1.0 and r.n == len(examples)
    assert result.majority_rate == pytest.approx(sum(r.majority_rate for r in result.per_field.values()) / 2)
    metrics = result.metrics()
    assert (
        metrics["downstream/accuracy"] == 1.0 and metrics["downstream/majority_rate"] == result.majority_rate
    )


def test_constant_answer_scores_its_frequency() -> None:
    """Always the first answer ("no" / "not on insulin"): accuracy is that value's share, per field."""
    examples = heldout_examples(_data(), "val")
    result = score_extraction(examples, lambda p, c: torch.zeros(len(p), len(c)), fields=["readmitted"])
    share = sum(record["readmitted"] == "NO" for _, record in examples) / len(examples)
    assert result.accuracy == pytest.approx(share) and list(result.per_field) == ["readmitted"]


def test_500_heldout_notes_on_request() -> None:
    data = _data()
    examples = heldout_examples(data, "test", num_notes=500)
    assert len(examples) == 500
    assert examples[:30] == list(zip(data.test_texts, data.split_records("test")))
    assert heldout_examples(data, "test", num_notes=500) == examples  # seeded
    train = set(data.train_texts)
    assert not any(note in train for note, _ in examples)
    for note, record in examples[30:]:  # fresh notes state their own record
        assert all(read_field(note, f) == record[f] for f in FIELDS)
    result = score_extraction(examples, reader_score_fn)
    assert result.n == 500 and result.accuracy == 1.0
    assert heldout_examples(data, "test", num_notes=10) == examples[:10]


def test_heldout_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DPLightningError, match="not held out"):
        heldout_examples(_data(), "train")
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(f"note {i}" for i in range(50)))
    with pytest.raises(DPLightningError, match="without records"):
        heldout_examples(TextDataModule(dataset=str(path), tokenizer=TINY), "test")
    with pytest.raises(DPLightningError, match="fields"):
        score_extraction(heldout_examples(_data(), "test"), reader_score_fn, fields=["A1Cresult"])


# ---------------------------------------------------------------------------------------- training data
def test_qa_off_is_bit_identical_to_the_data_before_the_option() -> None:
    """The digest was taken from the data module as it was before ``qa_fraction`` existed."""
    data = _data(qa_fraction=0.0)
    data.setup("fit")
    blob = json.dumps(
        [
            data.train_texts,
            data.val_texts,
            data.test_texts,
            data.train_dataset.input_ids,
            data.test_dataset.input_ids,
        ]
    )
    assert hashlib.sha256(blob.encode()).hexdigest() == (
        "fa64c83754e99d480365b28a374d89debc4414e529d9b89fdeee8f7f21901e32"
    )
    assert _data().train_texts == data.train_texts


def test_qa_on_appends_answers_to_training_notes_only() -> None:
    plain, qa = _data(), _data(qa_fraction=1.0)
    assert qa.val_texts == plain.val_texts and qa.test_texts == plain.test_texts
    assert len(qa.train_texts) == len(plain.train_texts)
    asked = Counter()
    for note, text, record in zip(plain.train_texts, qa.train_texts, qa.split_records("train")):
        field = next(f for f in FIELDS if text == qa_prompt(note, f) + qa_answer(record[f], f))
        asked[field] += 1
    assert set(asked) == set(FIELDS)  # a seeded random field per note
    assert qa.train_texts == _data(qa_fraction=1.0).train_texts
    assert qa.train_texts != _data(qa_fraction=1.0, data_seed=6).train_texts
    # a share: a subset of the same lines
    half = _data(qa_fraction=0.5).train_texts
    with_qa = [t for t in half if "Question: " in t]
    assert 0.3 < len(with_qa) / len(half) < 0.7 and set(with_qa) <= set(qa.train_texts)
    for note in plain.val_texts + plain.test_texts:
        assert "Question:" not in note and "Answer:" not in note


def test_heldout_prompts_contain_no_answers() -> None:
    for note, record in heldout_examples(_data(qa_fraction=1.0), "test", num_notes=60):
        for field in FIELDS:
            prompt = qa_prompt(note, field)
            assert prompt.endswith("Answer:") and prompt.count("Answer:") == 1
            assert not prompt.endswith(qa_answer(record[field], field))


def test_qa_option_errors_and_truncation_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(DPLightningError, match="qa_fraction"):
        _data(qa_fraction=1.5)
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(f"note {i}" for i in range(50)))
    with pytest.raises(DPLightningError, match="text file"):
        TextDataModule(dataset=str(path), tokenizer=TINY, qa_fraction=1.0).setup("fit")
    with caplog.at_level("WARNING"):
        _data(qa_fraction=1.0, max_length=64).setup("fit")
    assert "raise data.max_length" in caplog.text


# ------------------------------------------------------------------------------------------ LM scoring
def test_lm_scorer_is_the_log_probability_of_answer_and_eos() -> None:
    from dplightning.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(TINY, seed=0), load_tokenizer(TINY)
    prompts, answers = (
        ["A note. Question: Q? Answer:", "Another, longer note. Question: Q? Answer:"],
        [" no", " yes!"],
    )
    scores = lm_scorer(model, tok, batch_size=3)(prompts, answers)
    for i, prompt in enumerate(prompts):
        for j, answer in enumerate(answers):
            ids = torch.tensor([[*tok(prompt + answer)["input_ids"], tok.eos_token_id]])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            start = len(tok(prompt)["input_ids"])
            expected = logp[start - 1 :].gather(-1, ids[0, start:, None]).sum()
            assert scores[i, j].item() == pytest.approx(expected.item(), abs=1e-6)
    cut = lm_scorer(model, tok, max_length=12)(prompts, answers)  # left-truncated: still finite, still scored
    assert torch.isfinite(cut).all() and cut.shape == (2, 2)


def test_callback_smoke_in_a_two_step_dp_fit(tmp_path: Path) -> None:
    from dplightning.module import DPLoRAModule
    from dplightning.strategies import DPSGDStrategy

    callback = DownstreamAccuracy(num_notes=6, every_n_val_epochs=1, batch_size=32)
    data = TextDataModule(tokenizer=TINY, num_records=40, max_length=64, batch_size=8, qa_fraction=1.0)
    trainer = pl.Trainer(
        max_steps=2,
        val_check_interval=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        strategy=DPSGDStrategy(target_epsilon=8.0, target_delta=1e-3, max_grad_norm=1.0, device="cpu"),
        logger=pl.loggers.CSVLogger(tmp_path),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DPLoRAModule(model_name=TINY, lora_rank=2, seed=0), datamodule=data)
    result = callback.result
    assert result is not None and result.n == 6 and callback.result_step == 2
    assert 0.0 <= result.accuracy <= 1.0 and 0.0 < result.majority_rate <= 1.0
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "downstream/accuracy" in logged and "downstream/majority_rate" in logged
    with pytest.raises(DPLightningError, match="held out"):
        DownstreamAccuracy(split="train")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_prefix_shared_scoring_equals_running_every_text_whole(name: str) -> None:
    """The fast path (each prompt once, its KV cache repeated per answer) gives the scores of running every
    prompt + answer whole, on real notes with answers of different lengths, through ``DPLoRAModule``."""
    from dplightning.evaluation import field_extraction as fe
    from dplightning.module import DPLoRAModule

    module = DPLoRAModule(model_name=name, lora_rank=4)
    data = TextDataModule(tokenizer=name, num_records=300, data_seed=5, max_length=96)
    data.setup("fit")
    examples = fe.heldout_examples(data, "test", 9)
    pad = data.tokenizer.pad_token_id or 0
    for field in FIELDS:
        prompts = [fe.qa_prompt(note, field) for note, _ in examples]
        answers = [fe.qa_answer(v, field) for v in fe.QA_ANSWERS[field]]
        rows = fe._scored_tokens(data.tokenizer, prompts, answers, None)
        with torch.no_grad():
            whole = fe._full_scores(module, rows, 5, pad, "cpu")
            shared = fe._prefix_shared_scores(fe._causal_lm(module), rows, len(answers), 5, pad, "cpu")
        assert torch.isfinite(whole).all()
        assert torch.allclose(shared, whole, rtol=0, atol=1e-4), (shared - whole).abs().max()
        via_scorer = lm_scorer(module, data.tokenizer, batch_size=7)(prompts, answers)
        assert torch.allclose(via_scorer.flatten(), whole, rtol=0, atol=1e-4)
