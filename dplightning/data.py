"""Text data: a seeded pseudo-clinical corpus (Diabetes130-US schema), the real UCI CSV, ``.txt``/``.jsonl`` files.

:class:`TextDataModule` turns any of these into deterministic train / val / test (and optional public)
splits of short texts, tokenises them once in :meth:`TextDataModule.setup`, and serves padded causal-LM
batches. The training dataloader is a plain :class:`~torch.utils.data.DataLoader` so a DP strategy can swap
its sampler for a Poisson batch sampler; its ``collate_fn`` accepts an empty list.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dplightning.errors import DPLightningError

logger = logging.getLogger(__name__)

Record = dict[str, Any]

# --------------------------------------------------------------------------------------------- schema
AGE_BANDS: tuple[str, ...] = tuple(f"[{10 * i}-{10 * (i + 1)})" for i in range(10))
GENDERS: tuple[str, ...] = ("Female", "Male", "Unknown")
RACES: tuple[str, ...] = ("Caucasian", "AfricanAmerican", "Hispanic", "Asian", "Other", "Unknown")
ADMISSION_TYPES: tuple[str, ...] = ("Emergency", "Urgent", "Elective", "Newborn", "Trauma Center", "Unknown")
ADMISSION_SOURCES: tuple[str, ...] = (
    "Emergency Room", "Physician Referral", "Clinic Referral", "Transfer", "Other", "Unknown",
)
DIAGNOSIS_GROUPS: tuple[str, ...] = (
    "Circulatory", "Respiratory", "Digestive", "Diabetes", "Injury", "Musculoskeletal", "Genitourinary",
    "Neoplasms", "Other",
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

PSEUDO_CLINICAL = "pseudo_clinical"

# Marginals roughly as in Strack et al. 2014 (Diabetes 130-US hospitals, 1999-2008).
_AGE_P = (0.002, 0.007, 0.016, 0.037, 0.095, 0.170, 0.221, 0.256, 0.169, 0.027)
_GENDER_P = (0.538, 0.462, 0.0)
_RACE_P = (0.748, 0.189, 0.020, 0.006, 0.015, 0.022)
_ADM_TYPE_P = (0.530, 0.180, 0.190, 0.0, 0.005, 0.095)
# admission source given admission type (rows follow ADMISSION_TYPES, columns ADMISSION_SOURCES)
_SOURCE_GIVEN_TYPE = np.array(
    [
        [0.88, 0.05, 0.01, 0.05, 0.005, 0.005],  # Emergency
        [0.45, 0.35, 0.03, 0.12, 0.02, 0.03],  # Urgent
        [0.05, 0.75, 0.05, 0.12, 0.01, 0.02],  # Elective
        [0.0, 0.0, 0.0, 0.0, 0.9, 0.1],  # Newborn
        [0.80, 0.0, 0.0, 0.20, 0.0, 0.0],  # Trauma Center
        [0.45, 0.20, 0.03, 0.10, 0.02, 0.20],  # Unknown
    ]
)
_DIAG_P = np.array([0.30, 0.14, 0.09, 0.086, 0.068, 0.049, 0.05, 0.034, 0.18])


def _categorical(rng: np.random.Generator, probs: np.ndarray | Sequence[float], n: int) -> np.ndarray:
    """``n`` draws of category indices; ``probs`` is one distribution ``[K]`` or one per row ``[n, K]``."""
    p = np.asarray(probs, dtype=np.float64)
    cum = np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)
    u = rng.random(n)
    idx = np.searchsorted(cum, u, side="right") if cum.ndim == 1 else (u[:, None] >= cum).sum(axis=1)
    return np.minimum(idx, p.shape[-1] - 1)


def generate_records(n: int, seed: int) -> list[Record]:
    """``n`` synthetic Diabetes130-US-like encounters, reproducible from ``seed``.

    Marginals follow the published dataset roughly; correlations are built in: older patients have more
    diagnoses and longer stays, diabetes admissions get HbA1c tests (often high) and insulin changes, and
    readmission is more likely with more diagnoses, longer stays, emergency admissions and insulin changes.
    Vectorised: 100k records take well under a few seconds.
    """
    if n < 0:
        raise DPLightningError(f"number of records must be >= 0, got {n}; pass a non-negative num_records")
    rng = np.random.default_rng(seed)
    age = _categorical(rng, _AGE_P, n)
    gender = _categorical(rng, _GENDER_P, n)
    race = _categorical(rng, _RACE_P, n)

    adm_type = _categorical(rng, _ADM_TYPE_P, n)
    newborn = (age == 0) & (rng.random(n) < 0.3)
    adm_type = np.where(newborn, ADMISSION_TYPES.index("Newborn"), adm_type)
    adm_source = _categorical(rng, _SOURCE_GIVEN_TYPE[adm_type], n)
    emergency = adm_type == ADMISSION_TYPES.index("Emergency")
    elective = adm_type == ADMISSION_TYPES.index("Elective")

    weights = np.tile(_DIAG_P, (n, 1))
    young = age <= 3
    weights[young, DIAGNOSIS_GROUPS.index("Diabetes")] *= 4.0
    weights[young, DIAGNOSIS_GROUPS.index("Circulatory")] *= 0.3
    weights[age >= 8, DIAGNOSIS_GROUPS.index("Injury")] *= 1.8
    weights[elective, DIAGNOSIS_GROUPS.index("Musculoskeletal")] *= 3.0
    weights[elective, DIAGNOSIS_GROUPS.index("Neoplasms")] *= 2.0
    diag = _categorical(rng, weights, n)
    diabetes_dx = diag == DIAGNOSIS_GROUPS.index("Diabetes")

    # Length of stay: negative binomial (gamma-Poisson) whose mean grows with age and severity.
    mean_stay = 3.2 * (1.0 + 0.05 * (age - 6)) * np.where(elective, 0.85, 1.0)
    mean_stay *= np.where(np.isin(diag, [DIAGNOSIS_GROUPS.index(g) for g in ("Respiratory", "Injury")]), 1.2, 1.0)
    stay = 1 + rng.poisson(rng.gamma(2.0, np.maximum(mean_stay, 0.3) / 2.0))
    stay = np.clip(stay, 1, 14)

    latent_dx = 1 + rng.poisson(2.5 + 0.6 * age + 0.25 * stay)
    capped = rng.random(n) < 0.97  # most hospital systems recorded at most 9 diagnoses
    n_diag = np.clip(np.where(capped, np.minimum(latent_dx, 9), latent_dx), 1, 16)

    labs = np.rint(rng.normal(30.0 + 3.0 * stay - np.where(elective, 8.0, 0.0), 17.0))
    labs = np.clip(labs, 1, 132).astype(int)
    meds = np.rint(3.0 + 1.6 * stay + 0.4 * n_diag + rng.gamma(2.0, 2.0, n) + rng.normal(0.0, 2.0, n))
    meds = np.clip(meds, 1, 81).astype(int)

    a1c_tested = rng.random(n) < np.where(diabetes_dx, 0.45, 0.15) + np.where(emergency, 0.03, 0.0)
    a1c_level = _categorical(rng, np.where(diabetes_dx[:, None], [0.10, 0.15, 0.75], [0.32, 0.23, 0.45]), n)
    a1c = np.where(a1c_tested, 1 + a1c_level, 0)

    glu_tested = rng.random(n) < np.where(emergency, 0.07, 0.03)
    glu_level = _categorical(rng, np.where(diabetes_dx[:, None], [0.25, 0.30, 0.45], [0.50, 0.28, 0.22]), n)
    glucose = np.where(glu_tested, 1 + glu_level, 0)

    high_a1c = a1c >= A1C_RESULTS.index(">7")
    insulin_p = np.tile([0.53, 0.28, 0.09, 0.10], (n, 1))
    insulin_p[high_a1c] = [0.22, 0.28, 0.32, 0.18]
    insulin_p[young | diabetes_dx] = [0.12, 0.40, 0.28, 0.20]
    insulin = _categorical(rng, insulin_p, n)
    on_insulin = insulin != INSULIN_CHANGES.index("No")
    insulin_changed = insulin >= INSULIN_CHANGES.index("Up")
    dm_med = on_insulin | (rng.random(n) < np.where(high_a1c, 0.8, 0.5))

    # Readmission: multinomial logit against "NO".
    common = 0.12 * (n_diag - 7) + 0.05 * (stay - 4) + 0.18 * insulin_changed + 0.12 * emergency + 0.04 * (age - 6)
    logit_early = -1.75 + common + 0.10 * diabetes_dx
    logit_late = -0.62 + 0.8 * common + 0.15 * dm_med
    logits = np.stack([np.zeros(n), logit_early, logit_late], axis=1)
    probs = np.exp(logits)
    readmit = _categorical(rng, probs, n)

    columns = {
        "age": np.array(AGE_BANDS, dtype=object)[age],
        "gender": np.array(GENDERS, dtype=object)[gender],
        "race": np.array(RACES, dtype=object)[race],
        "admission_type": np.array(ADMISSION_TYPES, dtype=object)[adm_type],
        "admission_source": np.array(ADMISSION_SOURCES, dtype=object)[adm_source],
        "time_in_hospital": stay.astype(int).tolist(),
        "num_lab_procedures": labs.tolist(),
        "num_medications": meds.tolist(),
        "number_diagnoses": n_diag.astype(int).tolist(),
        "primary_diagnosis": np.array(DIAGNOSIS_GROUPS, dtype=object)[diag],
        "A1Cresult": np.array(A1C_RESULTS, dtype=object)[a1c],
        "max_glu_serum": np.array(GLUCOSE_RESULTS, dtype=object)[glucose],
        "insulin": np.array(INSULIN_CHANGES, dtype=object)[insulin],
        "diabetesMed": np.where(dm_med, "Yes", "No").astype(object),
        "readmitted": np.array(READMISSION, dtype=object)[readmit],
    }
    names = list(SCHEMA_FIELDS)
    values = [list(columns[k]) for k in names]
    return [dict(zip(names, row)) for row in zip(*values)]


# ------------------------------------------------------------------------------------------- notes
def _person(band: str, gender: str, rng: random.Random) -> tuple[str, str, str, str]:
    """(noun phrase with age, bare age descriptor, subject pronoun, possessive) for an age band and gender."""
    lo = int(band[1:].split("-")[0])
    hi = lo + 9
    if gender == "Female":
        noun, pronoun, possessive = rng.choice(["woman", "female patient"]), "she", "her"
    elif gender == "Male":
        noun, pronoun, possessive = rng.choice(["man", "male patient"]), "he", "his"
    else:
        noun, pronoun, possessive = "patient", "they", "their"
    if lo == 0:
        child = {"she": "girl", "he": "boy"}.get(pronoun, "child")
        return rng.choice([f"{child} under 10", f"{child} younger than ten"]), "under 10", pronoun, possessive
    options = [f"{lo}-{hi}-year-old {noun}", f"{noun} aged {lo} to {hi}"]
    if lo >= 20:
        options.append(f"{noun} in {possessive} {lo}s")
    return rng.choice(options), rng.choice([f"aged {lo}-{hi}", f"age {lo}-{hi}"]), pronoun, possessive


_RACE_TEXT = {"Caucasian": "Caucasian", "AfricanAmerican": "African American", "Hispanic": "Hispanic",
              "Asian": "Asian", "Other": "", "Unknown": ""}
_ADMISSION_TEXT = {
    "Emergency": ["an emergency admission", "an emergent admission"],
    "Urgent": ["an urgent admission", "an urgent same-day admission"],
    "Elective": ["an elective admission", "a planned admission"],
    "Newborn": ["a newborn admission"],
    "Trauma Center": ["a trauma center admission"],
    "Unknown": ["an admission of unrecorded type", "an admission"],
}
_SOURCE_TEXT = {
    "Emergency Room": ["via the emergency department", "through the ER"],
    "Physician Referral": ["on physician referral", "referred by the primary care physician"],
    "Clinic Referral": ["referred from clinic", "on clinic referral"],
    "Transfer": ["transferred from another facility", "as a transfer from an outside facility"],
    "Other": ["from another source"],
    "Unknown": ["from an unrecorded source"],
}
_DIAG_TEXT = {
    "Circulatory": ["a circulatory condition", "cardiovascular disease", "a circulatory system disorder"],
    "Respiratory": ["a respiratory illness", "respiratory disease", "a respiratory tract condition"],
    "Digestive": ["a digestive disorder", "a gastrointestinal condition"],
    "Diabetes": ["uncontrolled diabetes", "diabetes mellitus with complications", "a diabetic complication"],
    "Injury": ["an injury", "trauma-related injury", "an injury or poisoning"],
    "Musculoskeletal": ["a musculoskeletal problem", "a musculoskeletal condition"],
    "Genitourinary": ["a genitourinary condition", "a urinary tract disorder"],
    "Neoplasms": ["a neoplasm", "a tumor-related condition"],
    "Other": ["another medical condition", "a miscellaneous diagnosis"],
}
_A1C_TEXT = {
    "None": ["HbA1c was not measured", "no A1C was drawn", "A1C not tested"],
    "Norm": ["HbA1c was normal", "A1C within normal limits"],
    ">7": ["HbA1c was above 7%", "A1C elevated above 7%"],
    ">8": ["HbA1c was above 8%", "A1C markedly elevated above 8%"],
}
_GLU_TEXT = {
    "None": ["max serum glucose not measured", "no serum glucose test"],
    "Norm": ["serum glucose normal", "max glucose within normal range"],
    ">200": ["max serum glucose above 200 mg/dL", "peak glucose over 200"],
    ">300": ["max serum glucose above 300 mg/dL", "peak glucose over 300"],
}
_INSULIN_TEXT = {
    "No": ["not on insulin", "no insulin prescribed"],
    "Steady": ["insulin dose unchanged", "insulin continued at the same dose"],
    "Up": ["insulin dose increased", "insulin titrated up"],
    "Down": ["insulin dose reduced", "insulin titrated down"],
}
_MED_TEXT = {
    "Yes": ["discharged on diabetes medication", "diabetic medication prescribed"],
    "No": ["no diabetes medication prescribed", "not on diabetic medication"],
}
_READMIT_TEXT = {
    "NO": ["no readmission recorded", "not readmitted"],
    "<30": ["readmitted within 30 days", "readmitted in under 30 days"],
    ">30": ["readmitted after more than 30 days", "readmitted beyond 30 days"],
}
_SHORT_SEX = {"Female": "F", "Male": "M", "Unknown": "U"}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _phrases(record: Mapping[str, Any], rng: random.Random) -> dict[str, str]:
    """Every field of ``record`` as a (randomly chosen) phrase; the same rng state gives the same phrases."""
    person, age, pronoun, possessive = _person(str(record["age"]), str(record["gender"]), rng)
    race = _RACE_TEXT.get(str(record["race"]), "")
    stay = int(record["time_in_hospital"])
    return {
        "person": person,
        "age": age,
        "he": pronoun,
        "his": possessive,
        "race": race,
        "race_": f"{race} " if race else "",
        "admission": rng.choice(_ADMISSION_TEXT[str(record["admission_type"])]),
        "source": rng.choice(_SOURCE_TEXT[str(record["admission_source"])]),
        "diag": rng.choice(_DIAG_TEXT[str(record["primary_diagnosis"])]),
        "stay": f"{stay} day" + ("" if stay == 1 else "s"),
        "labs": str(record["num_lab_procedures"]),
        "meds": str(record["num_medications"]),
        "ndx": str(record["number_diagnoses"]),
        "a1c": rng.choice(_A1C_TEXT[str(record["A1Cresult"])]),
        "glu": rng.choice(_GLU_TEXT[str(record["max_glu_serum"])]),
        "insulin": rng.choice(_INSULIN_TEXT[str(record["insulin"])]),
        "dmmed": rng.choice(_MED_TEXT[str(record["diabetesMed"])]),
        "readmit": rng.choice(_READMIT_TEXT[str(record["readmitted"])]),
    }


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article ("an 80-89-year-old", "a woman")."""
    return ("an " if phrase[:1].lower() in "aeiou8" else "a ") + phrase


def _t_narrative(r: Mapping[str, Any], p: dict[str, str], rng: random.Random) -> str:
    return (
        f"Discharge summary: {_a(p['race_'] + p['person'])} seen after {p['admission']} {p['source']} for "
        f"{p['diag']}. Stayed {p['stay']} with {p['labs']} lab procedures and {p['meds']} medications; "
        f"{p['ndx']} diagnoses coded. {_cap(p['a1c'])}, {p['glu']}. {_cap(p['insulin'])}; {p['dmmed']}. "
        f"Follow-up: {p['readmit']}."
    )


def _t_structured(r: Mapping[str, Any], p: dict[str, str], rng: random.Random) -> str:
    return (
        f"DISCHARGE RECORD | age {r['age']} | sex {_SHORT_SEX.get(str(r['gender']), 'U')} | race {r['race']} | "
        f"admission {r['admission_type']} ({r['admission_source']}) | primary dx {r['primary_diagnosis']} | "
        f"LOS {r['time_in_hospital']} d | labs {p['labs']} | meds {p['meds']} | dx count {p['ndx']} | "
        f"A1C {r['A1Cresult']} | max glucose {r['max_glu_serum']} | insulin {r['insulin']} | "
        f"diabetes meds {r['diabetesMed']} | readmitted {r['readmitted']}"
    )


def _t_soap(r: Mapping[str, Any], p: dict[str, str], rng: random.Random) -> str:
    return (
        f"S: {_cap(_a(p['person']))} presenting with {p['diag']}, {p['admission']} {p['source']}. "
        f"O: {p['labs']} labs, {p['a1c']}, {p['glu']}. "
        f"A: {p['ndx']} active diagnoses; inpatient for {p['stay']}. "
        f"P: {p['insulin']}, {p['dmmed']}. Outcome: {p['readmit']}."
    )


_BRIEF_INSULIN = {"No": "none", "Steady": "steady", "Up": "up", "Down": "down"}


def _t_brief(r: Mapping[str, Any], p: dict[str, str], rng: random.Random) -> str:
    lo = int(str(r["age"])[1:].split("-")[0])
    sex = _SHORT_SEX.get(str(r["gender"]), "U")
    return (
        f"Pt {lo}-{lo + 9}{sex}, {p['diag']}, LOS {r['time_in_hospital']}d, {p['meds']} meds, "
        f"{p['ndx']} dx, A1C {r['A1Cresult']}, insulin {_BRIEF_INSULIN.get(str(r['insulin']), 'none')}, "
        f"{p['readmit']}."
    )


def _t_course(r: Mapping[str, Any], p: dict[str, str], rng: random.Random) -> str:
    opener = rng.choice(["Hospital course:", "Brief hospital course:"])
    return (
        f"{opener} this {p['race_']}{p['person']} came in as {p['admission']} with {p['diag']}. "
        f"During {p['his']} {p['stay']} on the ward {p['he']} underwent {p['labs']} lab procedures and received "
        f"{p['meds']} different medications. {_cap(p['a1c'])}. At discharge: {p['insulin']}, {p['dmmed']}. "
        f"{_cap(p['readmit'])}."
    )


def _t_bullets(r: Mapping[str, Any], p: dict[str, str], rng: random.Random) -> str:
    return (
        f"Discharge note - patient: {p['age']}; reason: {p['diag']}; admitted {p['source']}; "
        f"length of stay: {p['stay']}; workup: {p['labs']} labs, {p['glu']}; glycemic control: {p['a1c']}, "
        f"{p['insulin']}; medications: {p['meds']} ({p['dmmed']}); disposition: {p['readmit']}."
    )


def _t_reason(r: Mapping[str, Any], p: dict[str, str], rng: random.Random) -> str:
    return (
        f"Reason for admission: {p['diag']} in {_a(p['person'])}. Length of stay: {p['stay']}. "
        f"Diabetes management: {p['a1c']}; {p['insulin']}; {p['dmmed']}. "
        f"Comorbidity burden: {p['ndx']} diagnoses. Readmission: {p['readmit']}."
    )


def _t_nursing(r: Mapping[str, Any], p: dict[str, str], rng: random.Random) -> str:
    return (
        f"Nursing discharge note. {_cap(p['person'])} discharged on day {r['time_in_hospital']} "
        f"after {p['admission']}. {_cap(p['he'])} received {p['meds']} medications; {p['insulin']}. "
        f"{_cap(p['glu'])}. {_cap(p['readmit'])}."
    )


NOTE_TEMPLATES: tuple[Callable[[Mapping[str, Any], dict[str, str], random.Random], str], ...] = (
    _t_narrative, _t_structured, _t_soap, _t_brief, _t_course, _t_bullets, _t_reason, _t_nursing,
)
"""Note templates; :func:`render_note` picks one at random for each record."""


def render_note(record: Mapping[str, Any], rng: random.Random, template: int | None = None) -> str:
    """A short, single-line discharge note for ``record``.

    The template (one of :data:`NOTE_TEMPLATES`, unless ``template`` fixes its index) and the phrasing are
    drawn from ``rng``, so the same record and rng state always give the same text.
    """
    index = rng.randrange(len(NOTE_TEMPLATES)) if template is None else template
    phrases = _phrases(record, rng)
    return " ".join(NOTE_TEMPLATES[index](record, phrases, rng).split())


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
    "race", "gender", "age", "admission_type_id", "admission_source_id", "time_in_hospital",
    "num_lab_procedures", "num_medications", "number_diagnoses", "diag_1", "max_glu_serum", "A1Cresult",
    "insulin", "diabetesMed", "readmitted",
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
            f"{path}: line {line} has a non-numeric {column} ({row[column]!r}); fix or remove that row"
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
        raise DPLightningError(f"diabetes CSV not found at {path.resolve()}; pass the path of the UCI diabetic_data.csv")
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
                raise DPLightningError(f"{path}: line {line} has age {age!r}, expected a band like '[70-80)'; fix that row")
            gender = (row["gender"] or "").strip()
            race = (row["race"] or "").strip()
            records.append(
                {
                    "age": age,
                    "gender": gender if gender in ("Female", "Male") else "Unknown",
                    "race": race if race in RACES else ("Unknown" if race in ("", "?") else "Other"),
                    "admission_type": _ADMISSION_TYPE_IDS.get(_csv_int(row, "admission_type_id", line, path), "Unknown"),
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
        raise DPLightningError(f"unsupported text file type '{path.suffix or path.name}'; pass a .txt, .jsonl or .csv file")
    if not path.is_file():
        raise DPLightningError(f"text file not found at {path.resolve()}; check the data.dataset path")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DPLightningError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None
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
            raise DPLightningError(f"{path}: line {number} is not valid JSON ({exc.msg}); write one JSON object per line") from None
        text = item.get("text") if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise DPLightningError(f"{path}: line {number} has no 'text' string field; give every line a \"text\" key")
        if text.strip():
            texts.append(text)
    return texts


# ------------------------------------------------------------------------------------ torch datasets
class TokenizedDataset(Dataset):
    """Token id sequences; item ``i`` is ``{"input_ids": list[int]}``."""

    def __init__(self, input_ids: Sequence[Sequence[int]]) -> None:
        self.input_ids = [list(ids) for ids in input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[index]}


class CausalLMCollator:
    """Pads a list of ``{"input_ids": ...}`` items into a causal-LM batch.

    Returns ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, T]`` (long) with ``T`` the longest item
    (at most ``max_length``, longer items are truncated), padding on the right with ``pad_token_id`` and
    labels ``-100`` on padding. An empty list gives three ``(0, 0)`` tensors. Picklable (worker processes).
    """

    def __init__(self, pad_token_id: int, max_length: int) -> None:
        self.pad_token_id = int(pad_token_id)
        self.max_length = int(max_length)

    def __call__(self, items: Sequence[Mapping[str, Sequence[int] | Tensor]]) -> dict[str, Tensor]:
        if len(items) == 0:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone()}
        seqs = [torch.as_tensor(item["input_ids"], dtype=torch.long).reshape(-1)[: self.max_length] for item in items]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = seq
            attention_mask[row, : len(seq)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------------------- data module
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
            records = generate_records(max(int(hp.num_records), 0), hp.data_seed)
            rng = random.Random(hp.data_seed * 1_000_003 + 17)
            return [render_note(r, rng) for r in records]
        path = Path(name).expanduser()
        suffix = path.suffix.lower()
        if suffix == ".csv":
            records = load_diabetes_csv(path)
            rng = random.Random(hp.data_seed * 1_000_003 + 17)
            texts = [render_note(r, rng) for r in records]
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
