"""The Diabetes130-US record schema shared by the synthetic generator, the CSV loader and the note renderer."""

from __future__ import annotations

from typing import Any

Record = dict[str, Any]

AGE_BANDS: tuple[str, ...] = tuple(f"[{10 * i}-{10 * (i + 1)})" for i in range(10))
GENDERS: tuple[str, ...] = ("Female", "Male", "Unknown")
RACES: tuple[str, ...] = ("Caucasian", "AfricanAmerican", "Hispanic", "Asian", "Other", "Unknown")
ADMISSION_TYPES: tuple[str, ...] = ("Emergency", "Urgent", "Elective", "Newborn", "Trauma Center", "Unknown")
ADMISSION_SOURCES: tuple[str, ...] = (
    "Emergency Room",
    "Physician Referral",
    "Clinic Referral",
    "Transfer",
    "Other",
    "Unknown",
)
DIAGNOSIS_GROUPS: tuple[str, ...] = (
    "Circulatory",
    "Respiratory",
    "Digestive",
    "Diabetes",
    "Injury",
    "Musculoskeletal",
    "Genitourinary",
    "Neoplasms",
    "Other",
)
A1C_RESULTS: tuple[str, ...] = ("None", "Norm", ">7", ">8")
GLUCOSE_RESULTS: tuple[str, ...] = ("None", "Norm", ">200", ">300")
INSULIN_CHANGES: tuple[str, ...] = ("No", "Steady", "Up", "Down")
YES_NO: tuple[str, ...] = ("Yes", "No")
READMISSION: tuple[str, ...] = ("NO", "<30", ">30")

SCHEMA_FIELDS: dict[str, tuple[str, ...] | range] = {
    "age": AGE_BANDS,
    "gender": GENDERS,
    "race": RACES,
    "admission_type": ADMISSION_TYPES,
    "admission_source": ADMISSION_SOURCES,
    "time_in_hospital": range(1, 15),
    "num_lab_procedures": range(1, 133),
    "num_medications": range(1, 82),
    "number_diagnoses": range(1, 17),
    "primary_diagnosis": DIAGNOSIS_GROUPS,
    "A1Cresult": A1C_RESULTS,
    "max_glu_serum": GLUCOSE_RESULTS,
    "insulin": INSULIN_CHANGES,
    "diabetesMed": YES_NO,
    "readmitted": READMISSION,
}
"""Record field → allowed values (a tuple of category labels, or a ``range`` of integers)."""
