"""Discrimination of a Cox model: Harrell's c-index on held-out folds, for the model and its clinical and slide parts.

Discrimination is Harrell's c-index on held-out folds: ``cv_repeats`` × ``cv_folds``-fold cross-validation, folds
stratified by event and seeded by the workflow seed; the estimate is the mean over every held-out fold and the
interval the 2.5th–97.5th percentile of the fold values — the spread of the held-out estimate, not a confidence
interval of the mean; ``c_index_pooled`` is the c-index of every patient's out-of-fold x·β pooled per repeat
(steadier when folds hold few events). One sort per fold and lifelines' n log n concordance: n log n in patients
apart from the fits themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from histoclip.survival.cox import CoxFit, lifelines_fit
from histoclip.survival.settings import SurvivalSettings
from histoclip.survival.terms import Design, Term

log = logging.getLogger(__name__)

__all__ = ["CINDEX_COLUMNS", "cindex_rows", "cross_validated_cindex"]


def _stratified_folds(event: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold of every row: events and censored rows each shuffled and dealt round-robin, so every fold gets
    ⌊events/k⌋ or ⌈events/k⌉ events (a fold without events has no comparable pairs)."""
    folds = np.empty(len(event), dtype=np.int64)
    offset = 0
    for value in (1, 0):
        rows = np.flatnonzero(event == value)
        rows = rows[rng.permutation(len(rows))]
        folds[rows] = (np.arange(len(rows)) + offset) % k
        offset += len(rows)
    return folds


CINDEX_COLUMNS = [
    "endpoint",
    "model",
    "terms",
    "n",
    "events",
    "folds",
    "repeats",
    "c_index",
    "c_index_lower_95",
    "c_index_upper_95",
    "c_index_sd",
    "c_index_pooled",
    "valid_folds",
    "failed_folds",
    "apparent_c_index",
    "note",
]


def _held_out_scores(
    frame: pd.DataFrame, covariates: Sequence[str], k: int, settings: SurvivalSettings
) -> tuple[list[float], list[float], int]:
    """Every repeat's folds fitted and scored: (c-index of every held-out fold, pooled out-of-fold c-index of every
    repeat, number of fold fits that failed). Repeat r's folds are seeded by (seed, r)."""
    from lifelines.exceptions import ConvergenceError
    from lifelines.utils import concordance_index

    event = frame["event"].to_numpy().astype(int)
    values: list[float] = []
    pooled: list[float] = []
    failed = 0
    for repeat in range(settings.cv_repeats):
        folds = _stratified_folds(event, k, np.random.default_rng([settings.seed, repeat]))
        out_of_fold = np.full(len(frame), np.nan)
        for fold in range(k):
            train, test = frame[folds != fold], frame[folds == fold]
            kept = [c for c in covariates if train[c].nunique() > 1]
            if not kept:
                failed += 1
                continue
            try:
                model, _ = lifelines_fit(train[["time", "event", *kept]], settings)
            except (ConvergenceError, np.linalg.LinAlgError):
                failed += 1
                continue
            risk = test[kept].to_numpy() @ model.params_[kept].to_numpy()
            out_of_fold[folds == fold] = risk
            try:
                values.append(float(concordance_index(test["time"], -risk, test["event"])))
            except ZeroDivisionError:  # no comparable pair in this fold
                continue
        scored = np.isfinite(out_of_fold)
        if scored.sum() > 1:
            try:
                time_, event_ = frame["time"].to_numpy()[scored], event[scored]
                pooled.append(float(concordance_index(time_, -out_of_fold[scored], event_)))
            except ZeroDivisionError:
                pass
    return values, pooled, failed


def cross_validated_cindex(
    data: pd.DataFrame,
    covariates: Sequence[str],
    *,
    name: str,
    settings: SurvivalSettings,
    full_fit: CoxFit | None = None,
) -> dict[str, Any]:
    """Harrell's c-index of the Cox model on held-out folds (``cv_repeats`` × ``cv_folds``, stratified by event,
    seeded). Each fold's model is fitted on the other folds (same penalizer) and scores the held-out patients by
    their linear predictor x·β. Estimate: mean over held-out folds; interval: 2.5th–97.5th percentile of the
    fold values. Folds whose model fails are counted (``failed_folds``), not fatal.

    ``c_index_pooled`` is the steadier small-cohort variant: per repeat, one c-index over every patient's
    out-of-fold x·β (a Cox linear predictor has no intercept, so the folds' scores share a scale), averaged over
    repeats. With few events per fold, fold-level c-indices rest on a handful of comparable pairs each."""
    frame = data[["time", "event", *covariates]].astype(float)
    n, events = len(frame), int(frame["event"].sum())
    k = min(settings.cv_folds, events)
    row: dict[str, Any] = {
        "model": name,
        "n": n,
        "events": events,
        "folds": k,
        "repeats": settings.cv_repeats,
        "apparent_c_index": float(full_fit.model.concordance_index_) if full_fit and full_fit.model else np.nan,
        "note": "",
    }
    values: list[float] = []
    pooled: list[float] = []
    failed = 0
    if k < 2 or settings.cv_repeats < 1:
        row["note"] = f"not cross-validated: {events} event(s) for {settings.cv_folds} folds"
    else:
        values, pooled, failed = _held_out_scores(frame, covariates, k, settings)
        if failed:
            log.warning("c-index of %s: %d of %d fold fits failed", name, failed, k * settings.cv_repeats)
    array = np.asarray(values)
    row |= {
        "valid_folds": len(array),
        "failed_folds": failed,
        "c_index": float(array.mean()) if len(array) else np.nan,
        "c_index_lower_95": float(np.percentile(array, 2.5)) if len(array) else np.nan,
        "c_index_upper_95": float(np.percentile(array, 97.5)) if len(array) else np.nan,
        "c_index_sd": float(array.std(ddof=1)) if len(array) > 1 else np.nan,
        "c_index_pooled": float(np.mean(pooled)) if pooled else np.nan,
    }
    return row


def _cindex_models(terms: Sequence[Term]) -> list[tuple[str, list[Term]]]:
    """The multivariable model, and — when it mixes clinical and slide-derived terms — each part alone, so that
    the table shows what the slides add to the clinic."""
    models = [("multivariable", list(terms))]
    clinical = [t for t in terms if t.source == "clinical"]
    slide = [t for t in terms if t.source != "clinical"]
    if clinical and slide:
        models += [("clinical terms only", clinical), ("slide terms only", slide)]
    return models


def _quiet_fit(data: pd.DataFrame, covariates: Sequence[str], settings: SurvivalSettings) -> CoxFit | None:
    """A full-data fit for the apparent c-index of a sub-model; failures only cost that one number."""
    try:
        model, _ = lifelines_fit(data[["time", "event", *covariates]].astype(float), settings)
    except Exception:  # noqa: BLE001
        return None
    return CoxFit("sub-model", model, data, list(covariates), {}, {})


def cindex_rows(
    data: pd.DataFrame,
    fit: CoxFit,
    design: Design,
    terms: Sequence[Term],
    *,
    endpoint: str,
    settings: SurvivalSettings,
) -> list[dict[str, Any]]:
    """Rows of CINDEX_COLUMNS for the multivariable model ``fit`` of one endpoint and, when it mixes clinical and
    slide terms, for each part alone (on the same patients, with the covariates the full fit kept). A model that
    was not fitted gets one row saying why, and no c-index."""
    if not fit.fitted:
        row = {c: np.nan for c in CINDEX_COLUMNS} | {
            "endpoint": endpoint,
            "model": "multivariable",
            "terms": ", ".join(map(str, terms)),
            "n": fit.n,
            "events": fit.events,
            "repeats": settings.cv_repeats,
            "note": f"no c-index: the model was {fit.refused or 'not fitted'}",
        }
        return [row]
    rows = []
    for label, model_terms in _cindex_models(terms):
        kept = [c for c in design.columns(model_terms) if c in fit.covariates]
        if not kept:
            continue
        row = cross_validated_cindex(
            data,
            kept,
            name=f"{label} ({endpoint})",
            settings=settings,
            full_fit=fit if label == "multivariable" else _quiet_fit(data, kept, settings),
        )
        rows.append(row | {"endpoint": endpoint, "model": label, "terms": ", ".join(map(str, model_terms))})
    return rows
