"""Kaplan–Meier groupings: how each is written, and the group of every patient it gives.

A grouping (config ``survival.km_groupings``) is ``subtype`` (the patient's zero-shot call), ``cluster`` (the
patient's slide cluster) or ``clinical:COLUMN`` (a categorical column of the clinical table). Each reads the same
table as the model term of its kind (:data:`histoclip.survival.terms.TERM_KINDS`), so the survival rule's inputs
come from one place.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from histoclip.errors import InputError
from histoclip.survival.cells import MAX_LEVELS, natural_key, text
from histoclip.survival.patients import SlideFeatures
from histoclip.survival.terms import Term

log = logging.getLogger(__name__)

__all__ = ["GROUPING_KINDS", "GroupingKind", "group_labels", "grouping_file_name", "parse_grouping"]

#: A grouping's labeller: (grouping, the patients' clinical rows, their slide features) → (group of every patient,
#: NaN where it has none; every level in plotting order).
Labeller = Callable[[Term, pd.DataFrame, SlideFeatures], tuple[pd.Series, list[str]]]


def _call_groups(grouping: Term, clinical: pd.DataFrame, features: SlideFeatures) -> tuple[pd.Series, list[str]]:
    """The patient's zero-shot call; patients whose call abstains are left out."""
    calls = features.part("calls", "subtype:any")
    classes = [c[2:] for c in calls.columns if c.startswith("p_")]
    call = calls["call"].reindex(clinical.index)
    abstained = call.eq("")
    if abstained.any():
        log.warning("Kaplan–Meier by subtype: %d patient(s) abstain and are left out", int(abstained.sum()))
    return call.where(~abstained), classes


def _cluster_groups(grouping: Term, clinical: pd.DataFrame, features: SlideFeatures) -> tuple[pd.Series, list[str]]:
    """The patient's slide cluster, labelled ``cluster N``."""
    cluster = features.part("clusters", "cluster").reindex(clinical.index)
    labels = sorted(cluster.dropna().unique(), key=natural_key)
    return cluster.map(lambda v: f"cluster {v}" if pd.notna(v) else v), [f"cluster {v}" for v in labels]


def _clinical_groups(grouping: Term, clinical: pd.DataFrame, features: SlideFeatures) -> tuple[pd.Series, list[str]]:
    """The levels of a categorical clinical column (refused when there are too many to be categories)."""
    if grouping.name not in clinical.columns:
        raise InputError(
            f"Kaplan–Meier grouping {grouping!s}: the clinical table has no column {grouping.name!r}",
            where="clinical table",
            fix="correct survival.km_groupings",
        )
    values = text(clinical[grouping.name])
    levels = sorted(values.dropna().unique(), key=natural_key)
    if len(levels) > MAX_LEVELS:
        raise InputError(
            f"Kaplan–Meier grouping {grouping!s} has {len(levels)} levels",
            where="clinical table",
            fix="group by a categorical column (continuous values need cut points first)",
        )
    return values, levels


@dataclass(frozen=True)
class GroupingKind:
    """One kind of Kaplan–Meier grouping: whether it is written ``kind:NAME``, and how it labels patients."""

    named: bool
    labels: Labeller


GROUPING_KINDS: dict[str, GroupingKind] = {
    "subtype": GroupingKind(False, _call_groups),
    "cluster": GroupingKind(False, _cluster_groups),
    "clinical": GroupingKind(True, _clinical_groups),
}


def parse_grouping(grouping: str, *, where: str = "survival.km_groupings") -> Term:
    """A Kaplan–Meier grouping: ``subtype`` (patient zero-shot call), ``cluster`` or ``clinical:COLUMN``."""
    grouping = str(grouping).strip()
    kind, _, name = grouping.partition(":")
    spec = GROUPING_KINDS.get(kind)
    if spec is not None and not spec.named and not name:
        return Term(kind)
    if spec is not None and spec.named and name.strip():
        return Term(kind, name.strip())
    raise InputError(
        f"unknown Kaplan–Meier grouping {grouping!r}",
        where=where,
        fix="use subtype (zero-shot call), cluster (slide cluster) or clinical:COLUMN (a categorical column)",
    )


def group_labels(grouping: Term, clinical: pd.DataFrame, features: SlideFeatures) -> tuple[pd.Series, list[str]]:
    """Group of every patient of ``clinical`` (NaN where none) and every level in plotting order."""
    return GROUPING_KINDS[grouping.kind].labels(grouping, clinical, features)


def grouping_file_name(grouping: str) -> str:
    """``clinical:sex`` → ``clinical_sex``: a grouping as it appears in file names (km_{name}.tsv)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(grouping).strip())
