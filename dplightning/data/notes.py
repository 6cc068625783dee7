"""Short single-line discharge notes rendered from schema records, with seeded template and phrasing choice."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any


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


_RACE_TEXT = {
    "Caucasian": "Caucasian",
    "AfricanAmerican": "African American",
    "Hispanic": "Hispanic",
    "Asian": "Asian",
    "Other": "",
    "Unknown": "",
}
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
    _t_narrative,
    _t_structured,
    _t_soap,
    _t_brief,
    _t_course,
    _t_bullets,
    _t_reason,
    _t_nursing,
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


# ------------------------------------------------------------------------------ question / answer lines
# Only fields that every template above states are asked about: a question whose answer some notes do not
# contain would measure guessing, not extraction. Readmission and the insulin change appear in all eight
# templates; A1C (absent from the nursing note), glucose and the diabetes-medication flag do not.
QA_QUESTIONS: dict[str, str] = {
    "readmitted": "Was the patient readmitted?",
    "insulin": "What happened to the patient's insulin?",
}
"""Record field → the question asked about it."""

# Answers are plain words rather than the schema codes ("<30") and, within a field, no answer is a prefix of
# another, so scoring the answer followed by eos cannot confuse two of them.
QA_ANSWERS: dict[str, dict[str, str]] = {
    "readmitted": {"NO": "no", "<30": "within 30 days", ">30": "after 30 days"},
    "insulin": {"No": "not on insulin", "Steady": "unchanged", "Up": "increased", "Down": "decreased"},
}
"""Record field → {record value → answer text}."""


def qa_prompt(note: str, field: str) -> str:
    """``note`` followed by the question about ``field``, ending in ``"Answer:"`` (no answer)."""
    return f"{note} Question: {QA_QUESTIONS[field]} Answer:"


def qa_answer(value: Any, field: str) -> str:
    """The continuation of :func:`qa_prompt` that states ``value``: a space, then the answer text."""
    return " " + QA_ANSWERS[field][str(value)]


def append_qa(note: str, record: Mapping[str, Any], field: str) -> str:
    """``note`` with the question about ``field`` and the record's answer appended (a training text)."""
    return qa_prompt(note, field) + qa_answer(record[field], field)
