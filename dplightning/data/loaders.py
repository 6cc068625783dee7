"""Readers for examples on disk: the real UCI ``diabetic_data.csv`` (as schema records), ``.txt`` and ``.jsonl``."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

from dplightning.data.schema import (
    A1C_RESULTS,
    AGE_BANDS,
    GLUCOSE_RESULTS,
    INSULIN_CHANGES,
    RACES,
    READMISSION,
    YES_NO,
    Record,
)
from dplightning.errors import DPLightningError

# ------------------------------------------------------------------------------------------ real CSV
_ADMISSION_TYPE_IDS = {1: "Emergency", 2: "Urgent", 3: "Elective", 4: "Newborn", 7: "Trauma Center"}
_ADMISSION_SOURCE_IDS = {
    **dict.fromkeys((1,), "Physician Referral"),
    **dict.fromkeys((2, 3), "Clinic Referral"),
    **dict.fromkeys((4, 5, 6, 10, 18, 22, 25, 26), "Transfer"),
    **dict.fromkeys((7,), "Emergency Room"),
    **dict.fromkeys((8, 11, 12, 13, 14, 19, 23, 24), "Other"),
}
CSV_COLUMNS: tuple[str, ...] = (
    "race",
    "gender",
    "age",
    "admission_type_id",
    "admission_source_id",
    "time_in_hospital",
    "num_lab_procedures",
    "num_medications",
    "number_diagnoses",
    "diag_1",
    "max_glu_serum",
    "A1Cresult",
    "insulin",
    "diabetesMed",
    "readmitted",
)
"""Columns of the UCI ``diabetic_data.csv`` that :func:`load_diabetes_csv` needs."""


def icd9_group(code: str) -> str:
    """Primary-diagnosis group of an ICD-9 code (Strack et al. 2014 grouping); unparseable codes → ``Other``."""
    code = code.strip()
    if not code or code[0] in "VvEe?":
        return "Other"
    try:
        value = float(code)
    except ValueError:
        return "Other"
    if int(value) == 250:
        return "Diabetes"
    if 390 <= value < 460 or int(value) == 785:
        return "Circulatory"
    if 460 <= value < 520 or int(value) == 786:
        return "Respiratory"
    if 520 <= value < 580 or int(value) == 787:
        return "Digestive"
    if 800 <= value < 1000:
        return "Injury"
    if 710 <= value < 740:
        return "Musculoskeletal"
    if 580 <= value < 630 or int(value) == 788:
        return "Genitourinary"
    if 140 <= value < 240:
        return "Neoplasms"
    return "Other"


def _csv_int(row: Mapping[str, str], column: str, line: int, path: Path) -> int:
    try:
        return int(float(row[column]))
    except (TypeError, ValueError):
        raise DPLightningError(
            # the value is not echoed: an error message ends up in logs that leave the data owner's hands
            f"{path}: line {line} has a non-numeric {column}; fix or remove that row"
        ) from None


def _category(value: str, allowed: tuple[str, ...], default: str) -> str:
    value = (value or "").strip()
    return value if value in allowed else default


def load_diabetes_csv(path: str | Path) -> list[Record]:
    """Records (same schema as :func:`generate_records`) from the real UCI ``diabetic_data.csv``.

    Admission ids map to labels (unavailable/NULL/unmapped → ``Unknown``), ``diag_1`` ICD-9 codes to
    :data:`DIAGNOSIS_GROUPS`, ``?`` races to ``Unknown``, empty lab results to ``None``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DPLightningError(
            f"diabetes CSV not found at {path.resolve()}; pass the path of the UCI diabetic_data.csv"
        )
    records: list[Record] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise DPLightningError(
                f"{path} lacks the column(s) {', '.join(missing)}; pass the UCI diabetic_data.csv with its original header"
            )
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
            age = (row["age"] or "").strip()
            if age not in AGE_BANDS:
                raise DPLightningError(
                    f"{path}: line {line} has an age that is not a band like '[70-80)'; fix that row"
                )
            gender = (row["gender"] or "").strip()
            race = (row["race"] or "").strip()
            records.append(
                {
                    "age": age,
                    "gender": gender if gender in ("Female", "Male") else "Unknown",
                    "race": race if race in RACES else ("Unknown" if race in ("", "?") else "Other"),
                    "admission_type": _ADMISSION_TYPE_IDS.get(
                        _csv_int(row, "admission_type_id", line, path), "Unknown"
                    ),
                    "admission_source": _ADMISSION_SOURCE_IDS.get(
                        _csv_int(row, "admission_source_id", line, path), "Unknown"
                    ),
                    "time_in_hospital": min(max(_csv_int(row, "time_in_hospital", line, path), 1), 14),
                    "num_lab_procedures": min(max(_csv_int(row, "num_lab_procedures", line, path), 1), 132),
                    "num_medications": min(max(_csv_int(row, "num_medications", line, path), 1), 81),
                    "number_diagnoses": min(max(_csv_int(row, "number_diagnoses", line, path), 1), 16),
                    "primary_diagnosis": icd9_group(row["diag_1"] or ""),
                    "A1Cresult": _category(row["A1Cresult"], A1C_RESULTS, "None"),
                    "max_glu_serum": _category(row["max_glu_serum"], GLUCOSE_RESULTS, "None"),
                    "insulin": _category(row["insulin"], INSULIN_CHANGES, "No"),
                    "diabetesMed": _category(row["diabetesMed"], YES_NO, "No"),
                    "readmitted": _category(row["readmitted"], READMISSION, "NO"),
                }
            )
    if not records:
        raise DPLightningError(f"{path} has a header but no rows; pass a CSV with data rows")
    return records


# ------------------------------------------------------------------------------------------ text files
def read_text_file(path: str | Path) -> list[str]:
    """Examples from a text file.

    ``.txt``: one example per line, or, if the file contains blank lines, one example per blank-line-separated
    paragraph (its lines joined with newlines). ``.jsonl``: one JSON object per line with a ``text`` string.
    Blank lines and empty texts are skipped.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise DPLightningError(
            f"unsupported text file type '{path.suffix or path.name}'; pass a .txt, .jsonl or .csv file"
        )
    if not path.is_file():
        raise DPLightningError(f"text file not found at {path.resolve()}; check the data.dataset path")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DPLightningError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8"
        ) from None
    lines = content.splitlines()
    if suffix == ".txt":
        filled = [i for i, line in enumerate(lines) if line.strip()]
        inner = lines[filled[0] : filled[-1] + 1] if filled else []
        if any(not line.strip() for line in inner):
            paragraphs: list[str] = []
            current: list[str] = []
            for line in [*lines, ""]:
                if line.strip():
                    current.append(line.rstrip())
                elif current:
                    paragraphs.append("\n".join(current).strip())
                    current = []
            return paragraphs
        return [line.strip() for line in lines if line.strip()]
    texts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DPLightningError(
                f"{path}: line {number} is not valid JSON ({exc.msg}); write one JSON object per line"
            ) from None
        text = item.get("text") if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise DPLightningError(
                f"{path}: line {number} has no 'text' string field; give every line a \"text\" key"
            )
        if text.strip():
            texts.append(text)
    return texts
