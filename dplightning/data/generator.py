"""Seeded synthetic Diabetes130-US-like encounters (the records behind the ``pseudo_clinical`` notes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dplightning.data.schema import (
    A1C_RESULTS,
    ADMISSION_SOURCES,
    ADMISSION_TYPES,
    AGE_BANDS,
    DIAGNOSIS_GROUPS,
    GENDERS,
    GLUCOSE_RESULTS,
    INSULIN_CHANGES,
    RACES,
    READMISSION,
    SCHEMA_FIELDS,
    Record,
)
from dplightning.errors import DPLightningError

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
    mean_stay *= np.where(
        np.isin(diag, [DIAGNOSIS_GROUPS.index(g) for g in ("Respiratory", "Injury")]), 1.2, 1.0
    )
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
    common = (
        0.12 * (n_diag - 7) + 0.05 * (stay - 4) + 0.18 * insulin_changed + 0.12 * emergency + 0.04 * (age - 6)
    )
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
