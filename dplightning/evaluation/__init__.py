"""Downstream evaluation beyond perplexity: can the fine-tuned model answer questions about held-out notes?

:mod:`.field_extraction` asks a fixed question per record field about a held-out note and scores the answer by
exact match (the LM's most likely allowed answer); the ``DownstreamAccuracy`` callback runs it during fit.
"""

from dplightning.evaluation.field_extraction import (
    FIELDS,
    ExtractionResult,
    FieldResult,
    ScoreFn,
    evaluate_field_extraction,
    heldout_examples,
    lm_scorer,
    score_extraction,
)

__all__ = [
    "FIELDS",
    "ExtractionResult",
    "FieldResult",
    "ScoreFn",
    "evaluate_field_extraction",
    "heldout_examples",
    "lm_scorer",
    "score_extraction",
]
