"""SQuAD answer metrics: normalised exact match and token F1 (max over gold answers).

Normalisation follows the official SQuAD v1.1 script: lower-case, drop punctuation, drop the
articles a/an/the, squeeze white space.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(golds: str | Sequence[str]) -> list[str]:
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("need at least one gold answer to score against")
    return golds


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _as_list(golds)))


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: str | Sequence[str]) -> float:
    """Token-overlap F1 against the best-matching gold answer."""
    return max(_f1(prediction, g) for g in _as_list(golds))


def squad_scores(predictions: Sequence[str], golds: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1 (in %) over a dataset."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answer lists; pass one per question")
    if not predictions:
        raise ValueError("no predictions to score")
    n = len(predictions)
    return {
        "em": 100.0 * sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n,
        "f1": 100.0 * sum(f1_score(p, g) for p, g in zip(predictions, golds)) / n,
    }


def bootstrap_ci95(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of per-question scores: resample the
    questions with replacement. Two systems whose intervals overlap are not separated."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no scores to bootstrap")
    means = x[np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_bootstrap_ci95(a: Sequence[float], b: Sequence[float], resamples: int = 2000,
                          seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of mean(a) - mean(b) for two systems scored on the same
    questions (a[i] and b[i] are question i): each resample draws questions, keeping the pairs.
    Tighter than comparing two separate intervals, because a question's difficulty cancels; an
    interval that excludes 0 separates the two systems."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size == 0 or x.shape != y.shape:
        raise ValueError(f"paired scores need the same questions on both sides, got {x.size} and {y.size}")
    return bootstrap_ci95(x - y, resamples=resamples, seed=seed)
