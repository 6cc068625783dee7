"""Short single-line discharge notes rendered from schema records, with seeded template and phrasing choice."""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from typing_extensions import override


def _age_range(band: str) -> tuple[int, int]:
    """(youngest, oldest) age of a schema age band such as ``"[70-80)"``."""
    lo = int(band[1:].split("-")[0])
    return lo, lo + 9


def _person(band: str, gender: str, rng: random.Random) -> tuple[str, str, str, str]:
    """(noun phrase with age, bare age descriptor, subject pronoun, possessive) for an age band and gender."""
    lo, hi = _age_range(band)
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
_SHORT_INSULIN = {"No": "none", "Steady": "steady", "Up": "up", "Down": "down"}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _phrases(record: Mapping[str, Any], rng: random.Random) -> dict[str, str]:
    """Every field of ``record`` as a (randomly chosen) phrase, and the short forms some templates use; the same
    rng state gives the same phrases."""
    person, age, pronoun, possessive = _person(str(record["age"]), str(record["gender"]), rng)
    race = _RACE_TEXT.get(str(record["race"]), "")
    stay = int(record["time_in_hospital"])
    youngest, oldest = _age_range(str(record["age"]))
    return {
        "person": person,
        "race_person": f"{race} {person}" if race else person,
        "age": age,
        "ages": f"{youngest}-{oldest}",
        "sex": _SHORT_SEX.get(str(record["gender"]), "U"),
        "he": pronoun,
        "his": possessive,
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
        "insulin_change": _SHORT_INSULIN.get(str(record["insulin"]), "none"),
        "dmmed": rng.choice(_MED_TEXT[str(record["diabetesMed"])]),
        "readmit": rng.choice(_READMIT_TEXT[str(record["readmitted"])]),
    }


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article ("an 80-89-year-old", "a woman")."""
    return ("an " if phrase[:1].lower() in "aeiou8" else "a ") + phrase


class _NoteFormatter(string.Formatter):
    """``str.format`` with two format-spec letters for phrases, applied left to right: ``a`` puts the indefinite
    article in front, ``c`` capitalises the first letter (``{person:ac}``: "A 70-79-year-old woman")."""

    _EDITS: ClassVar[dict[str, Callable[[str], str]]] = {"a": _a, "c": _cap}

    @override
    def format_field(self, value: Any, format_spec: str) -> str:
        if not format_spec:
            return super().format_field(value, format_spec)
        text = str(value)
        for letter in format_spec:
            text = self._EDITS[letter](text)
        return text


_FORMATTER = _NoteFormatter()


@dataclass(frozen=True)
class NoteTemplate:
    """One way of writing a note. ``text`` is formatted with the record's phrases (``{diag}``, see
    :func:`_phrases`), its raw fields (``{record[A1Cresult]}``) and one option of each of ``choices``, drawn from
    the rng when the note is rendered (after the phrases, so the phrasing stream does not depend on it)."""

    text: str
    choices: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __call__(self, record: Mapping[str, Any], phrases: Mapping[str, str], rng: random.Random) -> str:
        drawn = {name: rng.choice(options) for name, options in self.choices.items()}
        return _FORMATTER.format(self.text, record=record, **phrases, **drawn)


NOTE_TEMPLATES: tuple[NoteTemplate, ...] = (
    NoteTemplate(
        "Discharge summary: {race_person:a} seen after {admission} {source} for {diag}. Stayed {stay} with "
        "{labs} lab procedures and {meds} medications; {ndx} diagnoses coded. {a1c:c}, {glu}. {insulin:c}; "
        "{dmmed}. Follow-up: {readmit}."
    ),
    NoteTemplate(
        "DISCHARGE RECORD | age {record[age]} | sex {sex} | race {record[race]} | "
        "admission {record[admission_type]} ({record[admission_source]}) | "
        "primary dx {record[primary_diagnosis]} | LOS {record[time_in_hospital]} d | labs {labs} | "
        "meds {meds} | dx count {ndx} | A1C {record[A1Cresult]} | max glucose {record[max_glu_serum]} | "
        "insulin {record[insulin]} | diabetes meds {record[diabetesMed]} | readmitted {record[readmitted]}"
    ),
    NoteTemplate(
        "S: {person:ac} presenting with {diag}, {admission} {source}. O: {labs} labs, {a1c}, {glu}. "
        "A: {ndx} active diagnoses; inpatient for {stay}. P: {insulin}, {dmmed}. Outcome: {readmit}."
    ),
    NoteTemplate(
        "Pt {ages}{sex}, {diag}, LOS {record[time_in_hospital]}d, {meds} meds, {ndx} dx, "
        "A1C {record[A1Cresult]}, insulin {insulin_change}, {readmit}."
    ),
    NoteTemplate(
        "{opener} this {race_person} came in as {admission} with {diag}. During {his} {stay} on the ward {he} "
        "underwent {labs} lab procedures and received {meds} different medications. {a1c:c}. "
        "At discharge: {insulin}, {dmmed}. {readmit:c}.",
        choices={"opener": ("Hospital course:", "Brief hospital course:")},
    ),
    NoteTemplate(
        "Discharge note - patient: {age}; reason: {diag}; admitted {source}; length of stay: {stay}; "
        "workup: {labs} labs, {glu}; glycemic control: {a1c}, {insulin}; medications: {meds} ({dmmed}); "
        "disposition: {readmit}."
    ),
    NoteTemplate(
        "Reason for admission: {diag} in {person:a}. Length of stay: {stay}. "
        "Diabetes management: {a1c}; {insulin}; {dmmed}. Comorbidity burden: {ndx} diagnoses. "
        "Readmission: {readmit}."
    ),
    NoteTemplate(
        "Nursing discharge note. {person:c} discharged on day {record[time_in_hospital]} after {admission}. "
        "{he:c} received {meds} medications; {insulin}. {glu:c}. {readmit:c}."
    ),
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
