"""Data: seeded pseudo-clinical records and notes, CSV/txt/jsonl loaders, splits, public split, canaries, collate."""

from __future__ import annotations

import csv
import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dplightning.data import (
    CSV_COLUMNS,
    NOTE_TEMPLATES,
    SCHEMA_FIELDS,
    CausalLMCollator,
    TextDataModule,
    generate_records,
    icd9_group,
    load_diabetes_csv,
    read_text_file,
    render_note,
)
from dplightning.errors import DPLightningError

TINY = "tiny-llama"
EOS, PAD = 258, 256  # the byte-level tiny tokenizer's ids


# ---------------------------------------------------------------------------------------- generator
def test_generate_records_is_deterministic_in_seed() -> None:
    assert generate_records(300, seed=3) == generate_records(300, seed=3)
    assert generate_records(300, seed=3) != generate_records(300, seed=4)
    assert generate_records(0, seed=1) == []


def test_records_follow_the_schema() -> None:
    records = generate_records(3000, seed=0)
    assert len(records) == 3000
    for record in records:
        assert list(record) == list(SCHEMA_FIELDS)
        for field, allowed in SCHEMA_FIELDS.items():
            assert record[field] in allowed, (field, record[field])
    for field in ("time_in_hospital", "num_lab_procedures", "num_medications", "number_diagnoses"):
        assert all(isinstance(r[field], int) for r in records)
    # every category of the main fields occurs, with plausible marginals
    assert {r["age"] for r in records} >= {"[50-60)", "[60-70)", "[70-80)", "[80-90)"}
    assert {r["readmitted"] for r in records} == {"NO", "<30", ">30"}
    assert {r["insulin"] for r in records} == {"No", "Steady", "Up", "Down"}
    readmit = Counter(r["readmitted"] for r in records)
    assert 0.45 < readmit["NO"] / 3000 < 0.62 and 0.06 < readmit["<30"] / 3000 < 0.16
    assert 3.5 < sum(r["time_in_hospital"] for r in records) / 3000 < 5.5


def test_readmission_correlates_with_diagnoses_and_stay() -> None:
    records = generate_records(20_000, seed=1)

    def readmit_rate(rows: list[dict]) -> float:
        return sum(r["readmitted"] != "NO" for r in rows) / len(rows)

    many = [r for r in records if r["number_diagnoses"] >= 9]
    few = [r for r in records if r["number_diagnoses"] <= 5]
    assert readmit_rate(many) > readmit_rate(few) + 0.08
    long_stay = [r for r in records if r["time_in_hospital"] >= 7]
    short_stay = [r for r in records if r["time_in_hospital"] <= 2]
    assert readmit_rate(long_stay) > readmit_rate(short_stay) + 0.04
    diabetes = [r for r in records if r["primary_diagnosis"] == "Diabetes"]
    assert sum(r["A1Cresult"] != "None" for r in diabetes) / len(diabetes) > 0.3


def test_generating_100k_records_is_fast() -> None:
    start = time.perf_counter()
    records = generate_records(100_000, seed=0)
    assert len(records) == 100_000
    assert time.perf_counter() - start < 10.0


# -------------------------------------------------------------------------------------------- notes
def test_notes_are_deterministic_in_the_rng_seed() -> None:
    records = generate_records(200, seed=0)
    first = [render_note(r, random.Random(7)) for r in records]
    again = [render_note(r, random.Random(7)) for r in records]
    assert first == again
    rng_a, rng_b = random.Random(1), random.Random(2)
    assert [render_note(r, rng_a) for r in records] != [render_note(r, rng_b) for r in records]


def test_notes_use_at_least_six_varied_templates() -> None:
    records = generate_records(400, seed=2)
    rng = random.Random(0)
    notes = [render_note(r, rng) for r in records]
    openings = Counter(" ".join(n.split()[:2]) for n in notes)
    assert len(openings) >= 6, openings
    assert all(n and "\n" not in n and len(n) < 600 for n in notes)
    assert len(set(notes)) > 390  # phrasing varies, not just the template
    forced = {render_note(records[0], random.Random(0), template=i) for i in range(len(NOTE_TEMPLATES))}
    assert len(NOTE_TEMPLATES) >= 6 and len(forced) == len(NOTE_TEMPLATES)


def test_note_mentions_record_facts() -> None:
    record = generate_records(1, seed=5)[0] | {"time_in_hospital": 11, "readmitted": "<30", "A1Cresult": ">8"}
    for i in range(len(NOTE_TEMPLATES)):
        note = render_note(record, random.Random(i), template=i)
        assert "11" in note, note
        assert "30" in note, note  # the readmission outcome


# ---------------------------------------------------------------------------------------------- CSV
def _write_diabetes_csv(
    path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = CSV_COLUMNS
) -> Path:
    header = ["encounter_id", "patient_nbr", *columns, "diag_2", "diag_3", "metformin"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        for i, row in enumerate(rows):
            full = {
                "encounter_id": str(1000 + i),
                "patient_nbr": str(9000 + i),
                "diag_2": "401",
                "diag_3": "?",
                "metformin": "No",
            }
            writer.writerow({**full, **{k: v for k, v in row.items() if k in header}})
    return path


_CSV_ROWS = [
    {
        "race": "Caucasian",
        "gender": "Female",
        "age": "[70-80)",
        "admission_type_id": "1",
        "admission_source_id": "7",
        "time_in_hospital": "5",
        "num_lab_procedures": "44",
        "num_medications": "16",
        "number_diagnoses": "9",
        "diag_1": "428",
        "max_glu_serum": "None",
        "A1Cresult": ">8",
        "insulin": "Up",
        "diabetesMed": "Yes",
        "readmitted": "<30",
    },
    {
        "race": "?",
        "gender": "Male",
        "age": "[50-60)",
        "admission_type_id": "6",
        "admission_source_id": "4",
        "time_in_hospital": "2",
        "num_lab_procedures": "10",
        "num_medications": "8",
        "number_diagnoses": "5",
        "diag_1": "250.83",
        "max_glu_serum": ">300",
        "A1Cresult": "",
        "insulin": "No",
        "diabetesMed": "No",
        "readmitted": "NO",
    },
    {
        "race": "AfricanAmerican",
        "gender": "Unknown/Invalid",
        "age": "[80-90)",
        "admission_type_id": "3",
        "admission_source_id": "1",
        "time_in_hospital": "14",
        "num_lab_procedures": "70",
        "num_medications": "30",
        "number_diagnoses": "16",
        "diag_1": "V57",
        "max_glu_serum": "Norm",
        "A1Cresult": "Norm",
        "insulin": "Steady",
        "diabetesMed": "Yes",
        "readmitted": ">30",
    },
    {
        "race": "Hispanic",
        "gender": "Female",
        "age": "[40-50)",
        "admission_type_id": "2",
        "admission_source_id": "2",
        "time_in_hospital": "3",
        "num_lab_procedures": "30",
        "num_medications": "12",
        "number_diagnoses": "7",
        "diag_1": "786",
        "max_glu_serum": ">200",
        "A1Cresult": ">7",
        "insulin": "Down",
        "diabetesMed": "Yes",
        "readmitted": "NO",
    },
]


def test_csv_loader_maps_the_uci_columns(tmp_path: Path) -> None:
    records = load_diabetes_csv(_write_diabetes_csv(tmp_path / "diabetic_data.csv", _CSV_ROWS))
    assert len(records) == 4
    first, second, third, fourth = records
    assert first == {
        "age": "[70-80)",
        "gender": "Female",
        "race": "Caucasian",
        "admission_type": "Emergency",
        "admission_source": "Emergency Room",
        "time_in_hospital": 5,
        "num_lab_procedures": 44,
        "num_medications": 16,
        "number_diagnoses": 9,
        "primary_diagnosis": "Circulatory",
        "A1Cresult": ">8",
        "max_glu_serum": "None",
        "insulin": "Up",
        "diabetesMed": "Yes",
        "readmitted": "<30",
    }
    assert second["race"] == "Unknown" and second["admission_type"] == "Unknown"
    assert second["admission_source"] == "Transfer" and second["primary_diagnosis"] == "Diabetes"
    assert second["A1Cresult"] == "None" and second["max_glu_serum"] == ">300"
    assert third["gender"] == "Unknown" and third["primary_diagnosis"] == "Other"
    assert third["admission_type"] == "Elective" and third["admission_source"] == "Physician Referral"
    assert fourth["primary_diagnosis"] == "Respiratory" and fourth["admission_source"] == "Clinic Referral"
    for record in records:
        assert all(record[f] in allowed for f, allowed in SCHEMA_FIELDS.items())


@pytest.mark.parametrize(
    ("code", "group"),
    [
        ("428", "Circulatory"),
        ("785", "Circulatory"),
        ("486", "Respiratory"),
        ("250.01", "Diabetes"),
        ("250", "Diabetes"),
        ("530", "Digestive"),
        ("820", "Injury"),
        ("715", "Musculoskeletal"),
        ("599", "Genitourinary"),
        ("162", "Neoplasms"),
        ("V57", "Other"),
        ("E909", "Other"),
        ("?", "Other"),
        ("", "Other"),
        ("780", "Other"),
    ],
)
def test_icd9_grouping(code: str, group: str) -> None:
    assert icd9_group(code) == group


def test_csv_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(DPLightningError, match="not found"):
        load_diabetes_csv(tmp_path / "nope.csv")
    without_a1c = tuple(c for c in CSV_COLUMNS if c != "A1Cresult")
    bad = _write_diabetes_csv(tmp_path / "bad.csv", _CSV_ROWS, columns=without_a1c)
    with pytest.raises(DPLightningError, match="A1Cresult") as err:
        load_diabetes_csv(bad)
    assert "\n" not in str(err.value)
    broken = _write_diabetes_csv(tmp_path / "broken.csv", [_CSV_ROWS[0] | {"time_in_hospital": "five"}])
    with pytest.raises(DPLightningError, match="line 2") as err:
        load_diabetes_csv(broken)
    assert "five" not in str(err.value)  # a record's value would leave with the message, in shared logs
    odd_age = _write_diabetes_csv(tmp_path / "age.csv", [_CSV_ROWS[0] | {"age": "[97-98)"}])
    with pytest.raises(DPLightningError, match="line 2") as err:
        load_diabetes_csv(odd_age)
    assert "97" not in str(err.value)


def test_csv_dataset_in_the_data_module(tmp_path: Path) -> None:
    path = _write_diabetes_csv(tmp_path / "diabetic_data.csv", _CSV_ROWS * 5)
    data = TextDataModule(
        dataset=str(path), tokenizer=TINY, val_fraction=0.1, test_fraction=0.1, max_length=64
    )
    data.setup("fit")
    assert len(data.train_texts) + len(data.val_texts) + len(data.test_texts) == 20
    assert len(data.train_dataset) == 16


def test_downstream_accuracy_on_a_private_file_needs_heldout_metrics(tmp_path: Path) -> None:
    from dplightning.evaluation import heldout_examples

    path = str(_write_diabetes_csv(tmp_path / "diabetic_data.csv", _CSV_ROWS * 5))
    with pytest.raises(DPLightningError, match=r"downstream accuracy .* data.heldout_metrics: true"):
        heldout_examples(TextDataModule(dataset=path, tokenizer=TINY), "test")
    opted_in = TextDataModule(dataset=path, tokenizer=TINY, heldout_metrics=True)
    assert len(heldout_examples(opted_in, "test")) == 2


# ---------------------------------------------------------------------------------------- text files
def test_txt_line_mode(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("first example\nsecond example  \nthird\n")
    assert read_text_file(path) == ["first example", "second example", "third"]


def test_txt_paragraph_mode(tmp_path: Path) -> None:
    path = tmp_path / "paras.txt"
    path.write_text("\npara one line a\npara one line b\n\n\npara two\n   \npara three\n\n")
    assert read_text_file(path) == ["para one line a\npara one line b", "para two", "para three"]


def test_jsonl_loader_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "data.jsonl"
    good.write_text(json.dumps({"text": "hello", "id": 1}) + "\n\n" + json.dumps({"text": "wörld"}) + "\n")
    assert read_text_file(good) == ["hello", "wörld"]
    missing = tmp_path / "missing_field.jsonl"
    missing.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DPLightningError, match="line 2") as err:
        read_text_file(missing)
    assert "text" in str(err.value) and "\n" not in str(err.value)
    invalid = tmp_path / "invalid.jsonl"
    invalid.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DPLightningError, match="line 2"):
        read_text_file(invalid)


def test_text_file_errors(tmp_path: Path) -> None:
    other = tmp_path / "data.parquet"
    other.write_text("x")
    with pytest.raises(DPLightningError, match=r"\.txt, \.jsonl"):
        read_text_file(other)
    with pytest.raises(DPLightningError, match="not found"):
        read_text_file(tmp_path / "absent.txt")
    with pytest.raises(DPLightningError, match="pseudo_clinical"):
        TextDataModule(dataset=str(tmp_path / "absent_dataset"), tokenizer=TINY).setup("fit")


# --------------------------------------------------------------------------------------------- splits
def _lines_file(tmp_path: Path, n: int = 200) -> Path:
    path = tmp_path / "examples.txt"
    path.write_text("\n".join(f"example number {i}" for i in range(n)) + "\n")
    return path


def test_splits_are_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = str(_lines_file(tmp_path))
    a = TextDataModule(dataset=path, tokenizer=TINY, val_fraction=0.1, test_fraction=0.2, data_seed=1)
    b = TextDataModule(dataset=path, tokenizer=TINY, val_fraction=0.1, test_fraction=0.2, data_seed=1)
    c = TextDataModule(dataset=path, tokenizer=TINY, val_fraction=0.1, test_fraction=0.2, data_seed=2)
    for dm in (a, b, c):
        dm.setup("fit")
    assert (a.train_texts, a.val_texts, a.test_texts) == (b.train_texts, b.val_texts, b.test_texts)
    assert a.test_texts != c.test_texts
    assert (len(a.train_texts), len(a.val_texts), len(a.test_texts)) == (140, 20, 40)
    train, val, test = set(a.train_texts), set(a.val_texts), set(a.test_texts)
    assert not (train & val or train & test or val & test)
    assert train | val | test == {f"example number {i}" for i in range(200)}
    assert a.public_texts == []
    assert a.num_train_examples == len(a.train_dataset) == 140


def test_pseudo_clinical_splits_are_deterministic() -> None:
    a = TextDataModule(tokenizer=TINY, num_records=300, data_seed=5)
    b = TextDataModule(tokenizer=TINY, num_records=300, data_seed=5)
    assert a.train_texts == b.train_texts and a.val_texts == b.val_texts
    assert len(a.train_texts) == 240 and len(a.val_texts) == 30 and len(a.test_texts) == 30
    assert TextDataModule(tokenizer=TINY, num_records=300, data_seed=6).train_texts != a.train_texts


def test_num_records_subsamples_files(tmp_path: Path) -> None:
    data = TextDataModule(
        dataset=str(_lines_file(tmp_path)), tokenizer=TINY, num_records=50, test_fraction=0.2
    )
    assert len(data.train_texts) + len(data.val_texts) + len(data.test_texts) == 50


def test_public_split(tmp_path: Path) -> None:
    path = str(_lines_file(tmp_path))
    data = TextDataModule(
        dataset=path,
        tokenizer=TINY,
        val_fraction=0.1,
        test_fraction=0.1,
        public_fraction=0.15,
        eval_batch_size=7,
    )
    data.setup("fit")
    public = set(data.public_texts)
    assert len(public) == 30
    assert not public & (set(data.train_texts) | set(data.val_texts) | set(data.test_texts))
    loader = data.public_dataloader()
    assert isinstance(loader, DataLoader) and sum(b["input_ids"].shape[0] for b in loader) == 30
    # val/test do not move when a public split is added
    plain = TextDataModule(dataset=path, tokenizer=TINY, val_fraction=0.1, test_fraction=0.1)
    assert plain.test_texts == data.test_texts and plain.val_texts == data.val_texts
    with pytest.raises(DPLightningError, match="public_fraction"):
        plain.public_dataloader()


def test_bad_fractions_are_one_line_errors() -> None:
    with pytest.raises(DPLightningError, match="sum < 1"):
        TextDataModule(tokenizer=TINY, val_fraction=0.5, test_fraction=0.3, public_fraction=0.3)
    with pytest.raises(DPLightningError, match="val_fraction"):
        TextDataModule(tokenizer=TINY, val_fraction=-0.1)


# -------------------------------------------------------------------------------------------- canaries
def test_canaries_before_setup(tmp_path: Path) -> None:
    data = TextDataModule(dataset=str(_lines_file(tmp_path, 100)), tokenizer=TINY, test_fraction=0.1)
    data.insert_canaries(["my secret is 1234", "the code is 9876"], repeats=[1, 3])
    data.setup("fit")
    counts = Counter(data.train_texts)
    assert counts["my secret is 1234"] == 1 and counts["the code is 9876"] == 3
    assert data.canaries == ["my secret is 1234", "the code is 9876"]
    assert data.num_train_examples == 80 + 4 == len(data.train_dataset)
    assert "my secret is 1234" not in data.val_texts + data.test_texts
    # the canary is tokenised into the train dataset: bytes + eos
    assert data.train_dataset[80]["input_ids"] == [*b"my secret is 1234", EOS]


def test_canaries_after_setup_are_applied(tmp_path: Path) -> None:
    data = TextDataModule(dataset=str(_lines_file(tmp_path, 100)), tokenizer=TINY, test_fraction=0.1)
    data.setup("fit")
    assert len(data.train_dataset) == 80
    data.insert_canaries(["canary a", "canary b"], repeats=5)
    assert len(data.train_dataset) == 90 == data.num_train_examples
    assert Counter(data.train_texts)["canary b"] == 5
    assert sum(len(b["input_ids"]) for b in data.train_dataloader()) == 90
    with pytest.raises(DPLightningError, match="repeat"):
        data.insert_canaries(["x", "y"], repeats=[1])


# --------------------------------------------------------------------------------------------- collate
def test_collate_pads_right_masks_labels_and_truncates() -> None:
    collate = CausalLMCollator(pad_token_id=PAD, max_length=4)
    batch = collate(
        [{"input_ids": [1, 2, 3]}, {"input_ids": [4]}, {"input_ids": torch.tensor([5, 6, 7, 8, 9, 10])}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, PAD], [4, PAD, PAD, PAD], [5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[1, 2, 3, -100], [4, -100, -100, -100], [5, 6, 7, 8]]
    assert all(t.dtype == torch.long for t in batch.values())
    short = collate([{"input_ids": [1]}, {"input_ids": [2, 3]}])
    assert short["input_ids"].shape == (2, 2)  # padded to the longest in the batch, not to max_length


def test_collate_empty_batch() -> None:
    empty = CausalLMCollator(pad_token_id=0, max_length=8)([])
    assert set(empty) == {"input_ids", "attention_mask", "labels"}
    assert all(t.shape == (0, 0) and t.dtype == torch.long for t in empty.values())


def test_dataloaders_yield_padded_batches_with_eos() -> None:
    data = TextDataModule(tokenizer=TINY, num_records=120, max_length=48, batch_size=8, eval_batch_size=5)
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader, DataLoader) and loader.dataset is data.train_dataset
    assert loader.batch_size == 8 and loader.collate_fn([])["input_ids"].shape == (0, 0)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 48
    assert batch["labels"][batch["attention_mask"] == 0].eq(-100).all()
    val = next(iter(data.val_dataloader()))
    assert val["input_ids"].shape[0] == 5
    test_batches = list(data.test_dataloader())
    assert sum(b["input_ids"].shape[0] for b in test_batches) == len(data.test_texts) == 12
    # eos appended to short texts, long texts truncated to max_length (no eos)
    data_long = TextDataModule(tokenizer=TINY, num_records=40, max_length=512)
    data_long.setup("fit")
    ids = data_long.train_dataset[0]["input_ids"]
    assert ids[-1] == EOS and bytes(ids[:-1]).decode() == data_long.train_texts[0]
    assert all(len(data.train_dataset[i]["input_ids"]) == 48 for i in range(len(data.train_dataset)))
    assert data.hparams.max_length == 48  # save_hyperparameters()
