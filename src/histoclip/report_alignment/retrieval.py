"""Report ↔ slide retrieval on held-out slides: recall@k and median rank, against chance.

``similarity[r, s]`` is the cosine of report ``r`` and slide ``s`` in the aligned space. Report → slide: a
report's rank is that of its best-ranked own slide among all held-out slides (a patient's report has several
own slides); slide → report: a slide's rank is that of its report among all held-out reports. Chance for a
query with ``m`` correct answers among ``n`` candidates: recall@k = 1 − C(n−m, k)/C(n, k), averaged over
queries; the median rank of a random order is about (n+1)/2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["retrieval_metrics"]


def _chance_recall(n: int, m: int, k: int) -> float:
    if k >= n:
        return 1.0
    return 1.0 - math.comb(n - m, k) / math.comb(n, k)


def _ranks(similarity: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """1-based rank of each row's best correct column (ties counted against the query: a pessimistic rank)."""
    best_correct = np.where(correct, similarity, -np.inf).max(axis=1)
    return 1 + (np.where(correct, -np.inf, similarity) >= best_correct[:, None]).sum(axis=1)


def _direction(similarity: np.ndarray, correct: np.ndarray, ks: Sequence[int]) -> dict[str, Any]:
    ranks = _ranks(similarity, correct)
    n = similarity.shape[1]
    m = correct.sum(axis=1)
    return {
        "n_queries": int(similarity.shape[0]),
        "n_candidates": int(n),
        "recall_at": {str(k): float(np.mean(ranks <= k)) for k in ks},
        "chance_recall_at": {str(k): float(np.mean([_chance_recall(n, int(mi), k) for mi in m])) for k in ks},
        "median_rank": float(np.median(ranks)),
        "chance_median_rank": float(np.median([(n + 1) / (mi + 1) for mi in m])),
        "ranks": ranks.tolist(),
    }


def retrieval_metrics(
    similarity: np.ndarray, report_ids: Sequence[str], slide_reports: Sequence[str], ks: Sequence[int]
) -> dict[str, Any]:
    """Both directions from ``similarity`` [reports × slides]; ``slide_reports[s]`` is the report id of slide s."""
    report_ids = list(report_ids)
    correct = np.asarray([[rid == sr for sr in slide_reports] for rid in report_ids], dtype=bool)
    if similarity.shape != correct.shape:
        raise ValueError(f"similarity {similarity.shape} does not match {len(report_ids)} reports × slides")
    if not correct.any(axis=1).all() or not correct.any(axis=0).all():
        raise ValueError("every report needs a slide and every slide its report among the candidates")
    return {
        "report_to_slide": _direction(similarity, correct, ks),
        "slide_to_report": _direction(similarity.T, correct.T, ks),
    }
