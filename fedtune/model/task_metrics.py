"""Task metrics on generated answers: exact match, token F1, ROUGE-L and label accuracy.

Exact match and token F1 follow the official SQuAD v1.1 evaluation script (Rajpurkar et al. 2016,
https://arxiv.org/abs/1606.05250, ``evaluate-v1.1.py``): both strings are lower-cased, stripped of
punctuation and of the articles a/an/the, and their whitespace is collapsed; F1 is the harmonic
mean of precision and recall over the multiset of tokens the two share. ROUGE-L (Lin 2004) is the
F-measure of the longest common subsequence of tokens, computed by Google's ``rouge-score`` package.
Corpus scores are means over examples, in [0, 1].
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import cache
from typing import Any

from fedtune.config.evaluation import ACCURACY, EXACT_MATCH, F1, GENERATED, KNOWN, LOSS, ROUGE_L, column, parse_names

__all__ = [
    "ACCURACY",
    "EXACT_MATCH",
    "F1",
    "GENERATED",
    "KNOWN",
    "LOSS",
    "ROUGE_L",
    "column",
    "exact_match",
    "normalize_answer",
    "parse_names",
    "rouge_l",
    "score",
    "token_f1",
]

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's ``normalize_answer``: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized strings are equal, else 0.0 (SQuAD v1.1)."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1 token F1: 2 P R / (P + R) over the shared multiset of normalized tokens.

    As in the official script, no shared token (including two empty strings) scores 0.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer  # imports nltk: only when ROUGE is asked for

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure from ``rouge_score`` (its tokenizer: lower case, ASCII letters and digits)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def score(
    names: Sequence[str], predictions: Sequence[str], references: Sequence[str], labels: Sequence[str | None]
) -> dict[str, float]:
    """Corpus means of the generated-answer metrics in ``names`` (``loss`` is skipped).

    Parameters
    ----------
    names
        Metric names from :data:`KNOWN`.
    predictions, references
        Generated answers and the records' reference outputs, in the same order.
    labels
        Each record's label (``data.label-field``) for ``accuracy``, None where a record has none;
        accuracy is the share of labelled records whose normalized answer equals the normalized
        label, and is absent when no record has a label.
    """
    per_example = {EXACT_MATCH: exact_match, F1: token_f1, ROUGE_L: rouge_l}
    out: dict[str, float] = {}
    for name in names:
        if name in per_example and predictions:
            values = [per_example[name](p, r) for p, r in zip(predictions, references, strict=True)]
            out[name] = sum(values) / len(values)
        elif name == ACCURACY:
            hits = [exact_match(p, label) for p, label in zip(predictions, labels, strict=True) if label is not None]
            if hits:
                out[name] = sum(hits) / len(hits)
    return out
