"""Slide outputs aggregated to patients: the zero-shot call, tissue and phenotype fractions, the slide cluster.

**Patient level**: a patient may have several slides. Probabilities and fractions are tile-count-weighted means
over the patient's slides (``n_tiles``; equal weights when a table has none) — the pooled value over all of the
patient's tiles; the patient's call is the class with the highest mean probability (abstaining when the two best
are closer than ``zeroshot.abstain_margin``); the patient's cluster is the one holding most of the patient's
tiles (ties: the smallest label). Slides that are not in the cohort sheet are ignored with a warning naming them.
Every aggregation is one groupby: linear in slides.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip.errors import InputError
from histoclip.formats import read_slide_tsv
from histoclip.survival.cells import id_list, is_missing, natural_rank, numeric

log = logging.getLogger(__name__)

__all__ = [
    "PARTS",
    "SlideFeatures",
    "load_slide_features",
    "patient_calls",
    "patient_clusters",
    "patient_means",
]


def _as_numbers(table: pd.DataFrame, columns: Sequence[str], where: str) -> pd.DataFrame:
    out = {}
    for column in columns:
        numbers, bad = numeric(table[column])
        if bad.any():
            raise InputError(
                f"column {column!r} has non-numeric values for slides {id_list(table.loc[bad, 'slide_id'])}",
                where=where,
                fix="re-run the stage that writes it",
            )
        out[column] = numbers
    return pd.DataFrame(out, index=table.index)


def _slide_owners(table: pd.DataFrame, slide_patients: Mapping[str, str] | None, where: str) -> pd.Series:
    """Patient of every slide of ``table``: the cohort sheet's, cross-checked with the table's own patient_id.

    Slides that neither knows are dropped with a warning (the table is older than the sheet)."""
    own = table["patient_id"] if "patient_id" in table.columns else pd.Series("", index=table.index)
    if slide_patients is None:
        owners = own.mask(own.eq(""))
    else:
        owners = table["slide_id"].map(slide_patients)
        clash = owners.notna() & own.ne("") & own.ne(owners)
        if clash.any():
            pairs = [
                f"{s}: {a} vs sheet {b}"
                for s, a, b in zip(table.loc[clash, "slide_id"], own[clash], owners[clash], strict=True)
            ]
            raise InputError(
                f"patient ids disagree with the cohort sheet for {id_list(pairs)}",
                where=where,
                fix="re-run the stage that wrote the table with the current sheet",
            )
        owners = owners.fillna(own.mask(own.eq("")))
    unknown = owners.isna()
    if unknown.any():
        log.warning(
            "%s: %d slide(s) are not in the cohort sheet and are ignored: %s",
            where,
            int(unknown.sum()),
            id_list(table.loc[unknown, "slide_id"]),
        )
    return owners


def _weights(table: pd.DataFrame, where: str) -> pd.Series:
    if "n_tiles" not in table.columns:
        log.info("%s has no n_tiles column: every slide of a patient weighs the same", where)
        return pd.Series(1.0, index=table.index)
    return _as_numbers(table, ["n_tiles"], where)["n_tiles"]


def patient_means(values: pd.DataFrame, patients: pd.Series, weights: pd.Series | None = None) -> pd.DataFrame:
    """Weighted mean of every column per patient (weights = tiles per slide): the value pooled over all of a
    patient's tiles. NaN cells and slides with no weight don't count; a patient with nothing left gets NaN.
    One groupby: linear in slides."""
    weights = pd.Series(1.0, index=values.index) if weights is None else weights.astype(float)
    usable = patients.notna() & weights.gt(0)
    values, patients, weights = values[usable], patients[usable], weights[usable]
    present = values.notna()
    numerator = values.fillna(0.0).mul(weights, axis=0).groupby(patients.to_numpy()).sum()
    denominator = present.mul(weights, axis=0).groupby(patients.to_numpy()).sum()
    means = numerator / denominator.where(denominator > 0)
    means.index.name = "patient_id"
    return means


def patient_calls(
    calls: pd.DataFrame, slide_patients: Mapping[str, str] | None, *, abstain_margin: float = 0.0, where: str = "calls"
) -> pd.DataFrame:
    """Per patient: tile-weighted mean ``p_<class>`` over the patient's slides, the ``call`` (class of the highest
    mean probability, empty when the two best are closer than ``abstain_margin``), ``margin`` and ``n_slides``."""
    p_columns = [c for c in calls.columns if c.startswith("p_")]
    if not p_columns:
        raise InputError("has no p_<class> columns", where=where, fix="re-run the zero-shot stage")
    probabilities = _as_numbers(calls, p_columns, where)
    if "status" in calls.columns:
        probabilities = probabilities.where(calls["status"].isin(["ok", ""]), np.nan, axis=0)
    owners = _slide_owners(calls, slide_patients, where)
    probabilities = probabilities.where(probabilities.notna().all(axis=1), np.nan, axis=0)
    means = patient_means(probabilities, owners, _weights(calls, where)).dropna(how="any")
    values = means.to_numpy()
    order = np.argsort(-values, axis=1, kind="stable")
    best = values[np.arange(len(values)), order[:, 0]]
    second = values[np.arange(len(values)), order[:, 1]] if values.shape[1] > 1 else np.zeros(len(values))
    margin = best - second
    classes = np.array([c[2:] for c in p_columns], dtype=object)
    call = np.where(margin < abstain_margin, "", classes[order[:, 0]]) if len(values) else np.array([], dtype=object)
    out = means.copy()
    out["call"] = call
    out["margin"] = margin
    out["n_slides"] = owners[probabilities.notna().all(axis=1)].value_counts().reindex(out.index).fillna(0).astype(int)
    return out


def patient_clusters(
    clusters: pd.DataFrame, slide_patients: Mapping[str, str] | None, *, where: str = "clusters"
) -> pd.Series:
    """Per patient: the cluster holding most of the patient's tiles (slides weighted by ``n_tiles`` when the
    table has it, else one vote each; ties go to the smallest label). Slides with an empty cluster are skipped."""
    owners = _slide_owners(clusters, slide_patients, where)
    weights = _weights(clusters, where)
    label = clusters["cluster"].astype(str).str.strip()
    keep = owners.notna() & label.ne("") & ~is_missing(label) & weights.gt(0)
    votes = pd.DataFrame({"patient_id": owners[keep], "cluster": label[keep], "weight": weights[keep]})
    totals = votes.groupby(["patient_id", "cluster"], sort=False)["weight"].sum().reset_index()
    totals["order"] = natural_rank(totals["cluster"])
    totals = totals.sort_values(["patient_id", "weight", "order"], ascending=[True, False, True], kind="stable")
    return totals.drop_duplicates("patient_id").set_index("patient_id")["cluster"].rename("cluster")


#: The SlideFeatures attribute that holds each slide-level table (by the name terms give their source) per patient.
PARTS = {"calls": "calls", "composition": "phenotypes", "class_composition": "class_fractions", "clusters": "clusters"}


@dataclass
class SlideFeatures:
    """Slide outputs aggregated to patients (index ``patient_id``); ``None`` where the table was not given."""

    calls: pd.DataFrame | None = None
    phenotypes: pd.DataFrame | None = None
    class_fractions: pd.DataFrame | None = None
    clusters: pd.Series | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def patients(self) -> set[str]:
        found: set[str] = set()
        for attribute in PARTS.values():
            part = getattr(self, attribute)
            if part is not None:
                found |= set(part.index)
        return found

    def part(self, source: str, term: str) -> Any:
        """The patient-level values of one slide-level table (a term kind's source) for ``term``; an error naming
        the term when the rule was not given that table."""
        values = getattr(self, PARTS[source])
        if values is None:
            raise InputError(
                f"model term {term} needs the {source.replace('_', ' ')} table, which was not given",
                where="survival",
                fix="give the rule that table, or remove the term",
            )
        return values


def load_slide_features(
    *,
    slide_patients: Mapping[str, str] | None,
    calls: str | Path | None = None,
    composition: str | Path | None = None,
    class_composition: str | Path | None = None,
    clusters: str | Path | None = None,
    abstain_margin: float = 0.0,
) -> SlideFeatures:
    """Read the slide-level tables that are given and aggregate each to patients."""
    features = SlideFeatures()
    if calls is not None:
        where = f"zero-shot calls {calls}"
        table = read_slide_tsv(calls, kind="zero-shot calls", required=["slide_id", "call"])
        features.calls = patient_calls(table, slide_patients, abstain_margin=abstain_margin, where=where)
        features.sources["calls"] = str(calls)
    for attribute, path, kind in (
        ("phenotypes", composition, "phenotype composition"),
        ("class_fractions", class_composition, "class composition"),
    ):
        if path is None:
            continue
        where = f"{kind} {path}"
        table = read_slide_tsv(path, kind=kind, required=["slide_id"])
        columns = [c for c in table.columns if c not in ("slide_id", "patient_id", "n_tiles")]
        if attribute == "phenotypes":
            columns = [c for c in columns if c.startswith("phenotype_")]
        values = _as_numbers(table, columns, where)
        means = patient_means(values, _slide_owners(table, slide_patients, where), _weights(table, where))
        setattr(features, attribute, means)
        features.sources[attribute] = str(path)
    if clusters is not None:
        where = f"slide clusters {clusters}"
        table = read_slide_tsv(clusters, kind="slide clusters", required=["slide_id", "cluster"])
        features.clusters = patient_clusters(table, slide_patients, where=where)
        features.sources["clusters"] = str(clusters)
    return features
