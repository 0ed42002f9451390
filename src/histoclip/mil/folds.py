"""Patient-level stratified folds: no patient's slides in two folds, classes spread evenly, seeded.

Why by patient: two slides of one patient share tissue, stain and scanner, so a model tested on a slide whose
sibling it was trained on looks better than it is. Why stratified: with a few dozen patients per class an
unstratified fold can miss a class, and then neither early stopping nor balanced accuracy means anything.
Used by the MIL cross-validation and by the site audit (which stratifies by site).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from histoclip.errors import InputError

__all__ = ["patient_folds", "patient_strata", "validation_split"]

log = logging.getLogger(__name__)


def patient_strata(patients: Sequence[str], labels: Sequence[str], *, where: str) -> pd.Series:
    """One class per patient (index: patient id, sorted): a patient whose slides have different classes is an
    error naming it, since its slides would have to be in one fold whatever their class."""
    frame = pd.DataFrame({"patient": list(map(str, patients)), "label": list(map(str, labels))})
    per_patient = frame.groupby("patient")["label"].unique()
    mixed = per_patient[per_patient.map(len) > 1]
    if len(mixed):
        first = mixed.index[0]
        raise InputError(
            f"{len(mixed)} patient(s) have slides of different classes, e.g. {first}: {sorted(mixed.iloc[0])}",
            where=where,
            fix="give every slide of a patient the same class, or split such patients into separate patient ids",
        )
    return per_patient.map(lambda values: values[0]).sort_index()


def _deal(strata: pd.Series, k: int, rng: np.random.Generator) -> pd.Series:
    """Patients of each stratum shuffled and dealt round-robin over ``k`` groups, continuing where the previous
    stratum stopped (so group sizes differ by at most one)."""
    group = pd.Series(0, index=strata.index, dtype=np.int64)
    offset = 0
    for value in sorted(strata.unique()):
        members = strata.index[strata == value].to_numpy()
        members = members[rng.permutation(len(members))]
        group[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)
    return group


def patient_folds(strata: pd.Series, folds: int, seed: int, *, where: str, what: str = "class") -> pd.Series:
    """Fold (0 … k-1) of every patient of ``strata`` (patient → class), stratified, seeded by ``seed``.

    k is ``folds``, capped at the patients of the smallest class (with a warning): a fold must hold every class
    for its metrics to mean anything. Fewer than 2 patients in some class is an error naming it."""
    counts = strata.value_counts()
    if len(counts) < 2:
        raise InputError(
            f"needs at least 2 {what}es with patients, found {sorted(counts.index)}",
            where=where,
            fix=f"check the {what} column of the cohort sheet",
        )
    smallest = counts.idxmin()
    k = min(folds, int(counts.min()))
    if k < 2:
        raise InputError(
            f"{what} {smallest!r} has {int(counts.min())} patient(s): cross-validation needs at least 2 per {what}",
            where=where,
            fix=f"add patients of {smallest!r}, or leave the {what} out",
        )
    if k < folds:
        log.warning(
            "%s: %d folds asked for, but %s %r has %d patients: using %d folds", where, folds, what, smallest, k, k
        )
    return _deal(strata, k, np.random.default_rng([seed, 0]))


def validation_split(strata: pd.Series, fraction: float, seed: int, fold: int) -> pd.Series:
    """Whether each patient of fold ``fold``'s training patients (patient → class) is held back for early stopping:
    ``fraction`` of each class (rounded, at least one while the class keeps one for training), drawn with
    (``seed``, ``fold``)."""
    rng = np.random.default_rng([seed, 1, fold])
    held = pd.Series(False, index=strata.index)
    for value in sorted(strata.unique()):
        members = strata.index[strata == value].to_numpy()
        members = members[rng.permutation(len(members))]
        n = int(round(fraction * len(members)))
        n = min(max(n, 1), len(members) - 1) if len(members) >= 2 else 0
        held[members[:n]] = True
    return held
