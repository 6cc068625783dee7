"""Canaries ("secret sharer", Carlini et al. 2019): generation, exposure, greedy extraction, membership scores.

A canary is ``prefix + secret``: the prefix is a note-like template with a random tag (so each canary has its
own prompt), the secret a random string of ``length`` symbols from ``alphabet``; the secret space R has
``|alphabet|^length`` elements.

**Exposure** = log2 |R| − log2 rank, where rank is the position of the true secret among all of R ordered by the
model's NLL of the secret given the prefix. R is too large to enumerate, so the rank is estimated from
``n`` secrets sampled uniformly from R: ``rank ≈ 1 + (|R| − 1)·(#sampled with lower NLL + ½ #ties)/n``. A
memorised canary beats every sample and gets the maximal exposure log2 |R|; the estimate cannot resolve
exposures between log2 n and log2 |R| (it reports the top value when no sample beats the canary).

**Extraction**: greedy decoding from the prefix for as many tokens as the secret has; token Jaccard
``|A ∩ B| / |A ∪ B|`` of the token sets, and exact match.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dplightning.errors import DPLightningError

DIGITS = "0123456789"
DEFAULT_TEMPLATE = "Record {tag}. Patient ID number: "
_TAG_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ"


@dataclass(frozen=True)
class Canary:
    """One secret and its prompt."""

    prefix: str
    secret: str

    @property
    def text(self) -> str:
        return self.prefix + self.secret


def random_secret(rng: random.Random, alphabet: str = DIGITS, length: int = 8) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def make_canaries(
    n: int, seed: int = 0, alphabet: str = DIGITS, length: int = 8, template: str = DEFAULT_TEMPLATE
) -> list[Canary]:
    """``n`` canaries with distinct random tags and random secrets, reproducible from ``seed``."""
    if n < 1 or length < 1 or len(set(alphabet)) < 2:
        raise DPLightningError(
            "need n >= 1 canaries, secret length >= 1 and an alphabet of >= 2 distinct symbols"
        )
    if "{tag}" not in template:
        raise DPLightningError(
            f"canary template {template!r} has no '{{tag}}' field; add one so prompts differ"
        )
    rng = random.Random(seed)
    tags: set[str] = set()
    out: list[Canary] = []
    while len(out) < n:
        tag = "".join(rng.choice(_TAG_ALPHABET) for _ in range(5))
        if tag in tags:
            continue
        tags.add(tag)
        out.append(Canary(template.format(tag=tag), random_secret(rng, alphabet, length)))
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def secret_token_split(tokenizer: Any, prefix: str, secret: str) -> tuple[list[int], int]:
    """Token ids of ``prefix + secret`` and the index of the first token that depends on the secret (the end of
    the longest common token prefix with the prefix alone: robust to BPE merges across the boundary)."""
    full = _encode(tokenizer, prefix + secret)
    head = _encode(tokenizer, prefix)
    start = 0
    while start < min(len(full), len(head)) and full[start] == head[start]:
        start += 1
    return full, max(start, 1)  # the first token is never scored (nothing predicts it)


@torch.no_grad()
def secret_nll(
    model: Any, tokenizer: Any, prefix: str, secrets: Sequence[str], batch_size: int = 64
) -> Tensor:
    """Summed NLL of each secret's tokens given ``prefix`` ``[len(secrets)]`` (lower = more likely)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[Tensor] = []
    for i in range(0, len(secrets), batch_size):
        split = [secret_token_split(tokenizer, prefix, s) for s in secrets[i : i + batch_size]]
        width = max(len(ids) for ids, _ in split)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(split), width), pad, dtype=torch.long)
        score = torch.zeros((len(split), width), dtype=torch.bool)
        for row, (tokens, start) in enumerate(split):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            score[row, start : len(tokens)] = True
        attn = (torch.arange(width)[None, :] < torch.tensor([len(t) for t, _ in split])[:, None]).long()
        logits = model(ids.to(device), attn.to(device))[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].to(device)[..., None]).squeeze(-1)
        out.append(-(logp * score[:, 1:].to(device)).sum(1).cpu())
    model.train(was_training)
    return torch.cat(out)


def exposure(canary_nll: float, reference_nlls: Tensor | np.ndarray, space_size: float) -> float:
    """log2 |R| − log2 rank, rank estimated from NLLs of secrets sampled uniformly from R (see module doc)."""
    ref = np.asarray(reference_nlls, dtype=np.float64).reshape(-1)
    if ref.size == 0:
        raise DPLightningError("exposure needs a non-empty reference sample of secrets")
    beaten_by = float((ref < canary_nll).sum() + 0.5 * (ref == canary_nll).sum())
    rank = 1.0 + (space_size - 1.0) * beaten_by / ref.size
    return math.log2(space_size) - math.log2(rank)


@torch.no_grad()
def greedy_extract(model: Any, tokenizer: Any, prefix: str, num_tokens: int) -> list[int]:
    """``num_tokens`` greedily decoded token ids after ``prefix``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([_encode(tokenizer, prefix)], device=device)
    new: list[int] = []
    for _ in range(num_tokens):
        logits = model(ids, torch.ones_like(ids))[:, -1]
        nxt = int(logits.argmax(-1))
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    model.train(was_training)
    return new


def token_jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """|A ∩ B| / |A ∪ B| of the token *sets* (1 for two empty sequences)."""
    sa, sb = set(a), set(b)
    return 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)


@dataclass
class CanaryResult:
    """Audit outcome of one canary."""

    canary: Canary
    included: bool
    repeats: int
    exposure: float
    jaccard: float
    extracted: bool


def audit_canaries(
    model: Any,
    tokenizer: Any,
    canaries: Sequence[Canary],
    included: Sequence[bool],
    repeats: Sequence[int],
    alphabet: str = DIGITS,
    reference_samples: int = 1000,
    seed: int = 0,
    extraction: bool = True,
) -> list[CanaryResult]:
    """Exposure (and greedy extraction) of every canary; ``repeats[i]`` is how often canary i was (or would have
    been) inserted. Each canary is ranked against ``reference_samples`` random secrets under its *own* prefix
    (a secret's NLL depends on its prompt)."""
    if not (len(canaries) == len(included) == len(repeats)):
        raise DPLightningError("need one inclusion flag and one repeat count per canary")
    if reference_samples < 10:
        raise DPLightningError(f"reference_samples must be >= 10, got {reference_samples}; e.g. 1000")
    rng = random.Random(seed + 7)
    results = []
    for canary, inc, rep in zip(canaries, included, repeats):
        length = len(canary.secret)
        space = float(len(alphabet)) ** length
        refs = [random_secret(rng, alphabet, length) for _ in range(reference_samples)]
        nll = secret_nll(model, tokenizer, canary.prefix, [canary.secret, *refs])
        exp = exposure(float(nll[0]), nll[1:], space)
        jac, exact = 0.0, False
        if extraction:
            full, start = secret_token_split(tokenizer, canary.prefix, canary.secret)
            target = full[start:]
            guess = greedy_extract(model, tokenizer, canary.prefix, len(target))
            jac, exact = token_jaccard(guess, target), guess == target
        results.append(CanaryResult(canary, bool(inc), int(rep), exp, jac, exact))
    return results


def membership_scores(model: Any, tokenizer: Any, canaries: Sequence[Canary]) -> np.ndarray:
    """Reference-calibrated canary membership scores ``[m]`` (higher = more likely inserted): the secret's NLL
    under the base model (LoRA adapters disabled, i.e. before fine-tuning) minus its NLL under the trained model.
    Without adapters to disable, just the negated NLL. Depends on the trained model only, as one-run auditing
    requires."""
    nll = np.array([float(secret_nll(model, tokenizer, c.prefix, [c.secret])[0]) for c in canaries])
    peft_model = getattr(model, "model", None)
    if peft_model is None or not hasattr(peft_model, "disable_adapter"):
        return -nll
    with peft_model.disable_adapter():
        ref = np.array([float(secret_nll(model, tokenizer, c.prefix, [c.secret])[0]) for c in canaries])
    return ref - nll


def summarise(results: Sequence[CanaryResult]) -> dict[str, float]:
    """Mean exposure / Jaccard / extraction rate per repetition count of the inserted canaries
    (``audit/canary/r{n}/...``) and of the never-inserted ones (``audit/canary/not_inserted/...``)."""
    out: dict[str, float] = {}
    groups: dict[str, list[CanaryResult]] = {}
    for r in results:
        groups.setdefault(f"r{r.repeats}" if r.included else "not_inserted", []).append(r)
    for name, rs in sorted(groups.items()):
        out[f"audit/canary/{name}/exposure"] = float(np.mean([r.exposure for r in rs]))
        out[f"audit/canary/{name}/jaccard"] = float(np.mean([r.jaccard for r in rs]))
        out[f"audit/canary/{name}/extracted"] = float(np.mean([r.extracted for r in rs]))
        out[f"audit/canary/{name}/count"] = float(len(rs))
    return out
