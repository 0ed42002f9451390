"""Evaluation of slide-level calls against ground-truth labels, with uncertainty and prompt sensitivity.

Why these metrics: cohorts are imbalanced, so balanced accuracy (mean per-class recall) and macro
one-vs-rest AUC are the headline numbers (the ones CONCH / MI-Zero report), Cohen's kappa adds agreement
beyond chance, and every number carries a bootstrap 95 % interval because cohorts of a few hundred slides
give intervals of several points. A classifier that answers one class for nearly every slide can still
look passable on some metrics, so that case is flagged in words. Prompt wording moves zero-shot results by
tens of points, so :func:`prompt_sensitivity` reports the spread over random prompt subsets.

Abstentions: a prediction of ``None`` is an abstention. Abstained slides are counted (``n_abstained``)
and excluded from every metric, AUC included, so all numbers describe the same answered slides. To score
without abstention, pass ``SlideCall.best`` as the predictions.

Metric definitions follow scikit-learn exactly (the tests compare against it): balanced accuracy =
mean recall over the classes present in the truth; macro AUC = mean over classes of the one-vs-rest AUC of
that class's probability column (for two classes, as in scikit-learn, the AUC of the second class's
column, which equals the one-vs-rest mean when rows sum to 1);
Cohen's kappa unweighted. They are computed here from the confusion matrix and ranks so that a thousand
bootstrap resamples stay fast.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from histoclip.zeroshot.prompts import PromptSet

__all__ = ["COLLAPSE_FRACTION", "binary_auc", "evaluate", "evaluated_slides", "prompt_sensitivity"]

logger = logging.getLogger(__name__)

#: At least this fraction of answered slides called as one class raises the ``collapsed`` flag.
COLLAPSE_FRACTION = 0.9


def _confusion(true_idx: np.ndarray, pred_idx: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(true_idx * n_classes + pred_idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _balanced_accuracy(cm: np.ndarray) -> float | None:
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return None
    return float(np.mean(np.diag(cm)[present] / support[present]))


def _kappa(cm: np.ndarray) -> float | None:
    total = cm.sum()
    if total == 0:
        return None
    observed = np.trace(cm) / total
    expected = float(cm.sum(axis=1) @ cm.sum(axis=0)) / total**2
    if expected >= 1.0:
        return None  # one class in both truth and predictions: agreement beyond chance is undefined
    return float((observed - expected) / (1.0 - expected))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (what the Mann-Whitney form of the AUC needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for the boolean ``positive`` (Mann-Whitney form, ties counted half)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    ranks = _average_ranks(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _macro_auc(true_idx: np.ndarray, probs: np.ndarray, n_classes: int) -> float | None:
    """Macro one-vs-rest AUC; None when a class is missing from the truth (its AUC is undefined)."""
    if np.bincount(true_idx, minlength=n_classes).min() == 0:
        return None
    if n_classes == 2:  # scikit-learn's binary case: the second class is positive, scored by its column
        return binary_auc(true_idx == 1, probs[:, 1])
    return float(np.mean([binary_auc(true_idx == c, probs[:, c]) for c in range(n_classes)]))


def _interval(values: list[float | None]) -> dict[str, Any]:
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return {"low": None, "high": None, "n_resamples": 0}
    low, high = np.percentile(finite, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "n_resamples": int(finite.size)}


def _indices(labels: Sequence[str], classes: list[str], what: str) -> np.ndarray:
    lookup = {cls: i for i, cls in enumerate(classes)}
    unknown = sorted({str(label) for label in labels if label not in lookup})
    if unknown:
        raise ValueError(f"{what} contain label(s) {unknown} that are not among the classes {classes}")
    return np.fromiter((lookup[label] for label in labels), dtype=np.int64, count=len(labels))


def evaluate(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    probabilities: np.ndarray | None,
    classes: list[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Score slide calls against labels; see the module docstring for definitions and abstention handling.

    ``probabilities`` is ``[n_slides, len(classes)]`` in ``classes`` order (or None: no AUC). Returns a dict:
    ``n``, ``n_abstained``, ``n_scored``, ``classes``, ``balanced_accuracy``, ``macro_auc``, ``cohen_kappa``,
    ``per_class_recall`` (class → recall, None if absent from the truth), ``confusion`` (true class →
    predicted class → count, in ``classes`` order), ``ci`` (metric → ``{low, high, n_resamples}``, a
    percentile bootstrap over slides; AUC skips resamples missing a class), ``collapsed`` and ``warning``.
    Metrics that are undefined (no answered slides, a class missing for AUC) are None.
    """
    classes = list(classes)
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"classes must be at least 2 distinct names, got {classes}")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred {len(y_pred)} predictions")
    n = len(y_true)
    answered = np.fromiter((p is not None for p in y_pred), dtype=bool, count=n)
    true_idx = _indices(list(y_true), classes, "ground-truth labels")
    pred_idx = np.full(n, -1, dtype=np.int64)
    pred_idx[answered] = _indices([p for p in y_pred if p is not None], classes, "predictions")
    probs = None
    if probabilities is not None:
        probs = np.asarray(probabilities, dtype=np.float64)
        if probs.shape != (n, len(classes)):
            raise ValueError(f"probabilities must have shape {(n, len(classes))} (slides × classes), got {probs.shape}")
    n_classes = len(classes)
    t, p = true_idx[answered], pred_idx[answered]
    pr = probs[answered] if probs is not None else None
    cm = _confusion(t, p, n_classes)
    support = cm.sum(axis=1)
    result: dict[str, Any] = {
        "n": n,
        "n_abstained": int(n - answered.sum()),
        "n_scored": int(answered.sum()),
        "classes": classes,
        "balanced_accuracy": _balanced_accuracy(cm),
        "macro_auc": _macro_auc(t, pr, n_classes) if pr is not None and len(t) else None,
        "cohen_kappa": _kappa(cm),
        "per_class_recall": {
            cls: (float(cm[i, i] / support[i]) if support[i] else None) for i, cls in enumerate(classes)
        },
        "confusion": {true: {pred: int(cm[i, j]) for j, pred in enumerate(classes)} for i, true in enumerate(classes)},
    }

    samples = _bootstrap_metrics(t, p, pr, n_classes, n_bootstrap, seed)
    result["ci"] = {
        metric: (_interval(values) if result[metric] is not None else {"low": None, "high": None, "n_resamples": 0})
        for metric, values in samples.items()
    }
    result["bootstrap"] = {"n_bootstrap": int(n_bootstrap), "seed": int(seed), "level": 0.95, "method": "percentile"}

    collapsed, warning = _collapse_warning(p, support, classes, n)
    result["collapsed"] = collapsed
    result["warning"] = warning
    if warning:
        logger.warning("%s", warning)
    return result


def _bootstrap_metrics(
    t: np.ndarray, p: np.ndarray, pr: np.ndarray | None, n_classes: int, n_bootstrap: int, seed: int
) -> dict[str, list[float | None]]:
    """Each metric on ``n_bootstrap`` resamples (with replacement) of the answered slides, one stream from
    ``seed``: true indices ``t``, called indices ``p``, probabilities ``pr`` (None: no AUC)."""
    samples: dict[str, list[float | None]] = {"balanced_accuracy": [], "macro_auc": [], "cohen_kappa": []}
    m = len(t)
    if n_bootstrap > 0 and m > 0:
        rng = np.random.default_rng(seed)
        for _ in range(n_bootstrap):
            pick = rng.integers(0, m, size=m)
            bcm = _confusion(t[pick], p[pick], n_classes)
            samples["balanced_accuracy"].append(_balanced_accuracy(bcm))
            samples["cohen_kappa"].append(_kappa(bcm))
            if pr is not None:
                samples["macro_auc"].append(_macro_auc(t[pick], pr[pick], n_classes))
    return samples


def _collapse_warning(p: np.ndarray, support: np.ndarray, classes: list[str], n: int) -> tuple[bool, str | None]:
    """Whether the calls ``p`` of the answered slides collapsed onto one class (``COLLAPSE_FRACTION`` of them),
    and the warning to give: collapse, or every one of the ``n`` slides abstained."""
    m = len(p)
    if m:
        counts = np.bincount(p, minlength=len(classes))
        top = int(np.argmax(counts))
        share = counts[top] / m
        if share >= COLLAPSE_FRACTION:
            truth_share = support[top] / m
            return True, (
                f"{share:.0%} of the {m} answered slides were called {classes[top]!r} (the truth has "
                f"{truth_share:.0%} {classes[top]!r}): the classifier has collapsed onto one class. Check the "
                "prompts (prompt sensitivity), that the embeddings are the projected image embeddings of the "
                "same model as the text classifier, and the pooling K."
            )
        return False, None
    if n:
        return (
            False,
            f"all {n} slides abstained: no metric can be computed; lower the abstain margin or check the model",
        )
    return False, None


def prompt_sensitivity(
    score_fn: Callable[[PromptSet], float | None],
    prompt_set: PromptSet,
    *,
    n_subsets: int = 20,
    template_fraction: float = 0.5,
    synonym_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Spread of a score (balanced accuracy) over random prompt subsets; the full set's score alongside.

    ``score_fn`` runs the whole zero-shot evaluation for one prompt set and returns its balanced accuracy
    (None or NaN when undefined; such subsets are counted in ``n_undefined`` and left out of the summary).
    Subsets are drawn with :meth:`PromptSet.subset` from one ``numpy`` generator seeded with ``seed``, so the
    same seed gives the same subsets.
    """
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be at least 1, got {n_subsets}")
    rng = np.random.default_rng(seed)
    subsets = [prompt_set.subset(rng, template_fraction, synonym_fraction) for _ in range(n_subsets)]
    raw = [score_fn(subset) for subset in subsets]
    values = [float(v) for v in raw if v is not None and math.isfinite(float(v))]
    full = score_fn(prompt_set)
    summary: dict[str, Any] = {
        "full": None if full is None or not math.isfinite(float(full)) else float(full),
        "values": [None if v is None or not math.isfinite(float(v)) else float(v) for v in raw],
        "subset_sha256": [subset.sha256 for subset in subsets],
        "n_subsets": n_subsets,
        "n_undefined": n_subsets - len(values),
        "template_fraction": template_fraction,
        "synonym_fraction": synonym_fraction,
        "seed": seed,
        "median": None,
        "q1": None,
        "q3": None,
        "iqr": None,
        "min": None,
        "max": None,
    }
    if values:
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        summary.update(
            median=float(median),
            q1=float(q1),
            q3=float(q3),
            iqr=float(q3 - q1),
            min=float(min(values)),
            max=float(max(values)),
        )
    return summary


def evaluated_slides(calls: pd.DataFrame, called: Sequence[str]) -> pd.DataFrame:
    """Slides that count for evaluation: labelled with a called class, scored, and not used for training."""
    keep = calls["label"].isin(called) & (calls["n_tiles"] > 0)
    if "split" in calls.columns:
        keep &= calls["split"].astype(str).str.lower() != "train"
    return calls[keep]
