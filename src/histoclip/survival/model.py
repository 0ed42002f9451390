"""Survival analysis of a slide cohort: a patient table, Kaplan–Meier curves with log-rank tests, Cox models.

Why this module exists: the point of a slide cohort study is usually whether something seen in the slides (a
zero-shot subtype, how much necrosis, which cluster) predicts outcome beyond what the clinic already knows.
That needs the slide outputs turned into one row per patient, a model that names its covariates in the field's
words, and every result reported with its uncertainty and its assumptions checked. lifelines does the fitting;
this module decides what goes in and says clearly when the data can't support a model.

**Endpoints** (config ``survival.endpoints``): a name, a time column and an event column of the clinical table,
and ``event_value``, the value of the event column that means "the event happened" (default 1, the clinical
table's convention ``event``: 1 = event, 0 = censored). CLAM/SurvPath tables have ``censorship`` (1 = censored):
either convert them once with :func:`event_table_from_censorship` (``python -m histoclip.survival
from-censorship``) or name the column with ``event_value: 0``. A column whose name says "censor" with
``event_value: 1``, or the ``event`` column with ``event_value: 0``, is refused: read the wrong way round every
hazard ratio flips, and nothing downstream would notice.

**Terms** of a model (config ``survival.multivariable`` / ``survival.univariable``), one string each:

===========================  =====================================================================================
``clinical:COLUMN``          a clinical-table column; numeric as is (per unit of the column), text as one
                             indicator per level, the most frequent level the reference (``clinical:sex=M``)
``subtype:CLASS``            1 if the patient's zero-shot call is CLASS, 0 for any other call (the reference);
                             patients whose call abstains are left out of the model
``p:CLASS``                  the patient's zero-shot probability of CLASS, per unit probability (0 → 1)
``class_fraction:CLASS``     fraction of the patient's tissue in the named tissue class (``class_composition.tsv``),
                             per unit fraction (0 → 1; a coefficient of 3 is × e^0.3 per +10 %)
``phenotype:COLUMN``         one phenotype fraction of ``composition.tsv`` (e.g. ``phenotype:phenotype_03``)
``phenotypes``               the whole phenotype composition. Fractions sum to 1, so the full set is collinear with
                             the intercept-free Cox model; one phenotype is the reference (``phenotype_reference``,
                             default the most abundant in the cohort). ``phenotype_transform: alr`` (default) uses
                             additive log-ratios log((f_k + c) / (f_ref + c)) with pseudo-count c
                             (``phenotype_pseudocount``) for the zeros every sparse composition has: a coefficient
                             is the log hazard ratio per e-fold increase of phenotype k relative to the reference.
                             ``drop_reference`` uses the raw fractions of the other phenotypes: a coefficient is
                             the effect of moving a unit of tissue from the reference phenotype to phenotype k
``cluster``                  the slide cluster, one indicator per cluster, the largest cluster the reference
===========================  =====================================================================================

**Patient level**: a patient may have several slides. Probabilities and fractions are tile-count-weighted means
over the patient's slides (``n_tiles``; equal weights when a table has none) — the pooled value over all of the
patient's tiles; the patient's call is the class with the highest mean probability (abstaining when the two best
are closer than ``zeroshot.abstain_margin``); the patient's cluster is the one holding most of the patient's
tiles (ties: the smallest label). Patients of the cohort sheet without a clinical row are left out with a
warning naming them.

**Models**: univariable Cox per term (each on the patients that have it), multivariable Cox with every term
(complete cases), optional elastic-net penalty (lifelines ``penalizer``, ``l1_ratio``; lifelines standardises
the covariates before penalising, and with a penalty the 95 % intervals are those of the penalised fit — not
valid confidence intervals). Proportional hazards are checked per covariate with lifelines'
``proportional_hazard_test`` (scaled Schoenfeld residuals against the rank of time). Discrimination is Harrell's
c-index on held-out folds: ``cv_repeats`` × ``cv_folds``-fold cross-validation, folds stratified by event and
seeded by the workflow seed; the estimate is the mean over every held-out fold and the interval the 2.5th–97.5th
percentile of the fold values — the spread of the held-out estimate, not a confidence interval of the mean;
``c_index_pooled`` is the c-index of every patient's out-of-fold x·β pooled per repeat (steadier when folds hold
few events).

Everything is linear or n log n in patients apart from lifelines' own fitting (groupby aggregation, one sort per
fold, lifelines' n log n concordance).
"""

from __future__ import annotations

import argparse
import logging
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "CoxFit",
    "Design",
    "DesignTerm",
    "Endpoint",
    "SlideFeatures",
    "SurvivalInputs",
    "SurvivalPlan",
    "SurvivalResult",
    "SurvivalSettings",
    "Term",
    "build_design",
    "cox_table",
    "cross_validated_cindex",
    "endpoint_frame",
    "event_table_from_censorship",
    "fit_cox",
    "grouping_file_name",
    "kaplan_meier",
    "load_slide_features",
    "parse_grouping",
    "parse_term",
    "patient_calls",
    "patient_clusters",
    "patient_means",
    "required_sources",
    "run_survival",
    "write_survival",
]

#: What each term kind means (README and error messages quote these).
TERM_KINDS: dict[str, str] = {
    "clinical": "clinical:COLUMN, a column of the clinical table",
    "subtype": "subtype:CLASS, 1 if the patient's zero-shot call is CLASS (reference: the other classes)",
    "p": "p:CLASS, the patient's zero-shot probability of CLASS",
    "class_fraction": "class_fraction:CLASS, fraction of tissue in a named tissue class (class_composition.tsv)",
    "phenotype": "phenotype:COLUMN, one phenotype fraction (composition.tsv)",
    "phenotypes": "phenotypes, the whole phenotype composition (log-ratios against a reference phenotype)",
    "cluster": "cluster, the slide cluster (indicators, reference = the largest cluster)",
}
#: The slide-level table each kind of term reads (``clinical`` reads the clinical table).
TERM_SOURCES: dict[str, str] = {
    "clinical": "clinical",
    "subtype": "calls",
    "p": "calls",
    "class_fraction": "class_composition",
    "phenotype": "composition",
    "phenotypes": "composition",
    "cluster": "clusters",
}
GROUPING_SOURCES: dict[str, str] = {"subtype": "calls", "cluster": "clusters", "clinical": "clinical"}
#: Kaplan–Meier groupings with more levels than this are almost certainly a continuous column by mistake.
MAX_KM_GROUPS = 20
_MISSING = {"", "na", "nan", "none", "null", "n/a", "."}
_CENSOR_NAME = re.compile(r"censor", re.IGNORECASE)


# --------------------------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """One survival endpoint: the clinical table's time column and event column, and which value is an event."""

    name: str
    time: str = "time"
    event: str = "event"
    event_value: int = 1

    @classmethod
    def from_config(cls, name: str, entry: Mapping[str, Any] | None) -> Endpoint:
        entry = dict(entry or {})
        endpoint = cls(
            name=name,
            time=str(entry.get("time", "time")),
            event=str(entry.get("event", "event")),
            event_value=int(entry.get("event_value", 1)),
        )
        endpoint.check_coding()
        return endpoint

    def check_coding(self, where: str | None = None) -> None:
        """Refuse the two ways to read censoring as events: it can't be caught later, every HR would flip."""
        where = where or f"survival.endpoints.{self.name}"
        if self.event_value not in (0, 1):
            raise InputError(f"event_value {self.event_value!r} is not 0 or 1", where=where, fix="set 1 or 0")
        if _CENSOR_NAME.search(self.event) and self.event_value == 1:
            raise InputError(
                f"event column {self.event!r} looks like a censoring indicator (1 = censored), but event_value is 1, "
                "which would count every censored patient as an event",
                where=where,
                fix=f"set event_value: 0 (an event is where {self.event} == 0), or convert the table to our "
                "convention (event = 1 - censorship) with `python -m histoclip.survival from-censorship`",
            )
        if self.event == "event" and self.event_value != 1:
            raise InputError(
                "the clinical table's `event` column is 1 = event, 0 = censored; event_value 0 would count every "
                "censored patient as an event",
                where=where,
                fix="remove event_value (default 1), or point `event` at a censoring column",
            )


def _numeric(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(numbers with missing markers as NaN, mask of cells that are neither missing nor a number)."""
    if pd.api.types.is_numeric_dtype(values):
        return values.astype(float), pd.Series(False, index=values.index)
    text = values.astype(str).str.strip()
    missing = text.str.lower().isin(_MISSING) | values.isna()
    numbers = pd.to_numeric(text.where(~missing), errors="coerce")
    return numbers, numbers.isna() & ~missing


def _ids(ids: Iterable[Any], limit: int = 20) -> str:
    ids = [str(i) for i in ids]
    shown = ", ".join(ids[:limit])
    return shown + (f" … and {len(ids) - limit} more" if len(ids) > limit else "")


def endpoint_frame(clinical: pd.DataFrame, endpoint: Endpoint, *, where: str = "clinical table") -> pd.DataFrame:
    """``time`` (float) and ``event`` (0/1 in our convention) of one endpoint, indexed like ``clinical``.

    Patients with a missing time or event are left out with a warning; an endpoint with no event at all is an
    error, because a Cox model or a log-rank test on it estimates nothing.
    """
    endpoint.check_coding()
    for column in (endpoint.time, endpoint.event):
        if column not in clinical.columns:
            raise InputError(
                f"endpoint {endpoint.name!r} needs column {column!r}, which is not there "
                f"(columns: {', '.join(map(str, clinical.columns))})",
                where=where,
                fix=f"add the column or set survival.endpoints.{endpoint.name}.time / .event to existing columns",
            )
    time, bad_time = _numeric(clinical[endpoint.time])
    raw_event, bad_event = _numeric(clinical[endpoint.event])
    problems = []
    for label, bad in ((endpoint.time, bad_time | (time < 0)), (endpoint.event, bad_event)):
        if bad.any():
            problems.append(f"column {label!r} has unusable values for {_ids(clinical.index[bad])}")
    wrong_code = raw_event.notna() & ~raw_event.isin([0, 1])
    if wrong_code.any():
        problems.append(f"column {endpoint.event!r} is not 0/1 for {_ids(clinical.index[wrong_code])}")
    if problems:
        raise InputError(
            f"endpoint {endpoint.name!r}: " + "; ".join(problems),
            where=where,
            fix="times must be numbers >= 0 and events 0 or 1 (empty cells are read as missing)",
        )
    missing = time.isna() | raw_event.isna()
    if missing.any():
        log.warning(
            "endpoint %s: %d patient(s) have no %s/%s value and are left out: %s",
            endpoint.name,
            int(missing.sum()),
            endpoint.time,
            endpoint.event,
            _ids(clinical.index[missing]),
        )
    frame = pd.DataFrame(
        {"time": time[~missing], "event": (raw_event[~missing] == endpoint.event_value).astype(int)},
        index=clinical.index[~missing],
    )
    if frame.empty or frame["event"].sum() == 0:
        raise InputError(
            f"endpoint {endpoint.name!r} has no events among its {len(frame)} patient(s) with a time "
            f"(column {endpoint.event!r} is never {endpoint.event_value})",
            where=where,
            fix="check the event column and its coding (survival.endpoints."
            f"{endpoint.name}.event / event_value), or drop the endpoint",
        )
    return frame


def event_table_from_censorship(
    table: pd.DataFrame,
    *,
    patient_column: str = "case_id",
    time_column: str = "survival_months",
    censorship_column: str = "censorship",
    endpoints: Mapping[str, tuple[str, str]] | None = None,
    where: str = "table",
) -> pd.DataFrame:
    """Convert a CLAM/SurvPath-style table (``censorship`` 1 = censored, often one row per slide) into a clinical
    table in our convention: one row per patient, ``patient_id``, ``time``, ``event`` = 1 - censorship.

    ``endpoints`` adds further endpoints as ``time_{name}`` / ``event_{name}`` from (time column, censorship
    column) pairs, e.g. ``{"dss": ("survival_months_dss", "censorship_dss")}``. Other columns are kept when they
    are the same on every row of a patient (slide-level columns such as ``slide_id`` are dropped, and logged).
    The converted censorship columns are dropped so that nobody can pick them up as an event by mistake.
    """
    pairs = {"": (time_column, censorship_column), **dict(endpoints or {})}
    required = [patient_column, *[c for pair in pairs.values() for c in pair]]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(
            f"missing column(s) {missing}; found {list(table.columns)}",
            where=where,
            fix="name the patient, time and censorship columns (patient_column, time_column, censorship_column)",
        )
    table = table.copy()
    table[patient_column] = table[patient_column].astype(str).str.strip()
    out = pd.DataFrame({"patient_id": table[patient_column]})
    for name, (time_col, censor_col) in pairs.items():
        time, bad_time = _numeric(table[time_col])
        censor, bad_censor = _numeric(table[censor_col])
        bad = bad_time | (time < 0) | bad_censor | (censor.notna() & ~censor.isin([0, 1]))
        if bad.any():
            raise InputError(
                f"rows {_ids((table.index[bad] + 2).tolist())} have a time that is not a number >= 0 or a "
                f"censorship that is not 0/1 (columns {time_col!r}, {censor_col!r})",
                where=where,
                fix="correct those rows (line numbers count the header as line 1)",
            )
        suffix = f"_{name}" if name else ""
        out[f"time{suffix}"] = time
        out[f"event{suffix}"] = (1 - censor).astype("Int64")
    converted = {patient_column, *[c for pair in pairs.values() for c in pair]}
    for column in table.columns:
        if column not in converted and column not in out.columns:
            out[column] = table[column]
    grouped = out.groupby("patient_id", sort=False)
    varying = grouped.nunique(dropna=False).gt(1).any()
    endpoint_columns = [c for c in out.columns if c.startswith(("time", "event"))]
    inconsistent = [c for c in endpoint_columns if varying.get(c, False)]
    if inconsistent:
        counts = grouped[inconsistent].nunique(dropna=False)
        patients = counts.index[counts.gt(1).any(axis=1)]
        raise InputError(
            f"patients {_ids(patients)} have different survival values on different rows ({inconsistent})",
            where=where,
            fix="one time and censorship per patient: correct the rows",
        )
    dropped = [c for c in out.columns if varying.get(c, False)]
    if dropped:
        log.info("columns that differ between rows of one patient are dropped (slide-level): %s", ", ".join(dropped))
    result = grouped.first().reset_index()
    result = result[[c for c in result.columns if c not in dropped]]
    result["event"] = result["event"].astype(int)
    return result


# ------------------------------------------------------------------------------------------------- terms


@dataclass(frozen=True)
class Term:
    """One term of a Cox model as written in the config (``kind:name`` or a bare ``kind``)."""

    kind: str
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name is not None else self.kind

    @property
    def source(self) -> str:
        return TERM_SOURCES[self.kind]


def parse_term(text: str, *, where: str = "survival config") -> Term:
    """``clinical:age`` → Term("clinical", "age"); unknown kinds and missing names are errors naming the term."""
    text = str(text).strip()
    kind, sep, name = text.partition(":")
    kind = kind.strip()
    name = name.strip()
    if kind not in TERM_KINDS:
        raise InputError(
            f"unknown model term {text!r}",
            where=where,
            fix="write terms as one of: " + "; ".join(TERM_KINDS.values()),
        )
    if kind in ("phenotypes", "cluster"):
        if sep and name:
            raise InputError(f"term {text!r}: {kind!r} takes no name", where=where, fix=f"write just {kind!r}")
        return Term(kind)
    if not name:
        raise InputError(f"term {text!r} needs a name after ':'", where=where, fix=TERM_KINDS[kind])
    return Term(kind, name)


def parse_grouping(text: str, *, where: str = "survival.km_groupings") -> Term:
    """A Kaplan–Meier grouping: ``subtype`` (patient zero-shot call), ``cluster`` or ``clinical:COLUMN``."""
    text = str(text).strip()
    kind, _, name = text.partition(":")
    if kind in ("subtype", "cluster") and not name:
        return Term(kind)
    if kind == "clinical" and name.strip():
        return Term("clinical", name.strip())
    raise InputError(
        f"unknown Kaplan–Meier grouping {text!r}",
        where=where,
        fix="use subtype (zero-shot call), cluster (slide cluster) or clinical:COLUMN (a categorical column)",
    )


def grouping_file_name(grouping: str) -> str:
    """``clinical:sex`` → ``clinical_sex``: a grouping as it appears in file names (km_{name}.tsv)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(grouping).strip())


# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class SurvivalSettings:
    """Config key ``survival`` (fitting options), plus the workflow ``seed`` and ``zeroshot.abstain_margin``."""

    penalizer: float = 0.0
    l1_ratio: float = 0.0
    cv_folds: int = 5
    cv_repeats: int = 5
    min_events_per_covariate: float = 10.0
    ph_alpha: float = 0.05
    phenotype_transform: str = "alr"
    phenotype_reference: str | None = None
    phenotype_pseudocount: float = 0.01
    abstain_margin: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], *, seed: int = 0, abstain_margin: float = 0.0) -> SurvivalSettings:
        fields = {k: v for k, v in entry.items() if k in cls.__dataclass_fields__ and k not in ("seed",)}
        fields.setdefault("abstain_margin", abstain_margin)
        return cls(**fields, seed=seed)


@dataclass(frozen=True)
class SurvivalPlan:
    """What to analyse: endpoints, model terms, Kaplan–Meier groupings and the fitting settings."""

    endpoints: tuple[Endpoint, ...]
    multivariable: tuple[Term, ...]
    univariable: tuple[Term, ...]
    groupings: tuple[str, ...] = ()
    settings: SurvivalSettings = field(default_factory=SurvivalSettings)

    @classmethod
    def from_config(cls, section: Mapping[str, Any], *, seed: int = 0, abstain_margin: float = 0.0) -> SurvivalPlan:
        endpoints = tuple(Endpoint.from_config(n, e) for n, e in (section.get("endpoints") or {}).items())
        if not endpoints:
            raise InputError(
                "no endpoint", where="survival.endpoints", fix="add one, e.g. os: {time: time, event: event}"
            )
        multivariable = tuple(parse_term(t, where="survival.multivariable") for t in section.get("multivariable") or [])
        uni = section.get("univariable")
        univariable = multivariable if uni is None else tuple(parse_term(t, where="survival.univariable") for t in uni)
        for name, terms in (("multivariable", multivariable), ("univariable", univariable)):
            texts = [str(t) for t in terms]
            duplicates = sorted({t for t in texts if texts.count(t) > 1})
            if duplicates:
                raise InputError(f"duplicate term(s) {duplicates}", where=f"survival.{name}", fix="list each once")
        groupings = tuple(str(g) for g in section.get("km_groupings") or [])
        for g in groupings:
            parse_grouping(g)
        names = [grouping_file_name(g) for g in groupings]
        if len(set(names)) != len(names):
            raise InputError(
                f"km_groupings {list(groupings)} repeat a name", where="survival.km_groupings", fix="list each once"
            )
        settings = SurvivalSettings.from_config(section, seed=seed, abstain_margin=abstain_margin)
        if settings.phenotype_transform not in ("alr", "drop_reference"):
            raise InputError(
                f"phenotype_transform {settings.phenotype_transform!r}",
                where="survival",
                fix="use alr or drop_reference",
            )
        return cls(endpoints, multivariable, univariable, groupings, settings)


def required_sources(plan: SurvivalPlan) -> list[str]:
    """Slide-level tables the plan reads (``calls``, ``composition``, ``class_composition``, ``clusters``), in a
    fixed order: the rule's inputs, so that a model of clinical terms alone doesn't wait for the clustering."""
    kinds = {t.source for t in (*plan.multivariable, *plan.univariable)}
    kinds |= {GROUPING_SOURCES[parse_grouping(g).kind] for g in plan.groupings}
    return [s for s in ("calls", "composition", "class_composition", "clusters") if s in kinds]


# ------------------------------------------------------------------------------------ slide → patient tables


def read_slide_table(path: str | Path, *, kind: str, required: Sequence[str]) -> pd.DataFrame:
    """A slide-level TSV as text (``slide_id`` unique), with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", where=f"{kind} {path}", fix="run the stage that writes it")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise InputError(
            f"cannot be read ({exc})", where=f"{kind} {path}", fix="re-run the stage that writes it"
        ) from exc
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(
            f"missing column(s) {missing}; found {list(table.columns)}", where=f"{kind} {path}", fix="re-run its stage"
        )
    duplicated = table["slide_id"][table["slide_id"].duplicated()]
    if len(duplicated):
        raise InputError(f"duplicate slide ids {_ids(duplicated)}", where=f"{kind} {path}", fix="re-run its stage")
    return table


def _as_numbers(table: pd.DataFrame, columns: Sequence[str], where: str) -> pd.DataFrame:
    out = {}
    for column in columns:
        numbers, bad = _numeric(table[column])
        if bad.any():
            raise InputError(
                f"column {column!r} has non-numeric values for slides {_ids(table.loc[bad, 'slide_id'])}",
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
                f"patient ids disagree with the cohort sheet for {_ids(pairs)}",
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
            _ids(table.loc[unknown, "slide_id"]),
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
    keep = owners.notna() & label.ne("") & ~label.str.lower().isin(_MISSING) & weights.gt(0)
    votes = pd.DataFrame({"patient_id": owners[keep], "cluster": label[keep], "weight": weights[keep]})
    totals = votes.groupby(["patient_id", "cluster"], sort=False)["weight"].sum().reset_index()
    totals["order"] = _natural_rank(totals["cluster"])
    totals = totals.sort_values(["patient_id", "weight", "order"], ascending=[True, False, True], kind="stable")
    return totals.drop_duplicates("patient_id").set_index("patient_id")["cluster"].rename("cluster")


def _natural_key(label: Any) -> tuple[int, float, str]:
    text = str(label)
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _natural_rank(labels: pd.Series) -> pd.Series:
    order = {v: i for i, v in enumerate(sorted(labels.unique(), key=_natural_key))}
    return labels.map(order)


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
        for part in (self.calls, self.phenotypes, self.class_fractions, self.clusters):
            if part is not None:
                found |= set(part.index)
        return found


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
        table = read_slide_table(calls, kind="zero-shot calls", required=["slide_id", "call"])
        features.calls = patient_calls(table, slide_patients, abstain_margin=abstain_margin, where=where)
        features.sources["calls"] = str(calls)
    for attribute, path, kind in (
        ("phenotypes", composition, "phenotype composition"),
        ("class_fractions", class_composition, "class composition"),
    ):
        if path is None:
            continue
        where = f"{kind} {path}"
        table = read_slide_table(path, kind=kind, required=["slide_id"])
        columns = [c for c in table.columns if c not in ("slide_id", "patient_id", "n_tiles")]
        if attribute == "phenotypes":
            columns = [c for c in columns if c.startswith("phenotype_")]
        values = _as_numbers(table, columns, where)
        means = patient_means(values, _slide_owners(table, slide_patients, where), _weights(table, where))
        setattr(features, attribute, means)
        features.sources[attribute] = str(path)
    if clusters is not None:
        where = f"slide clusters {clusters}"
        table = read_slide_table(clusters, kind="slide clusters", required=["slide_id", "cluster"])
        features.clusters = patient_clusters(table, slide_patients, where=where)
        features.sources["clusters"] = str(clusters)
    return features


# ---------------------------------------------------------------------------------------------- design


@dataclass
class DesignTerm:
    """A term expanded into covariate columns, with what its coefficients compare against."""

    term: Term
    columns: list[str]
    reference: str
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class Design:
    """Covariate columns per patient (index ``patient_id``; NaN where a patient lacks the term)."""

    frame: pd.DataFrame
    terms: dict[str, DesignTerm]

    def columns(self, terms: Iterable[Term]) -> list[str]:
        return [c for t in terms for c in self.terms[str(t)].columns]


def _fraction_column(fractions: pd.DataFrame, term: Term, key: str, missing: str, *, where: str, fix: str) -> pd.Series:
    """The fraction column a term names, or an error saying which columns there are."""
    if term.name not in fractions.columns:
        raise InputError(f"model term {key}: {missing}", where=where, fix=fix)
    return fractions[term.name]


def _need(part: Any, term: Term, features: SlideFeatures) -> Any:
    if part is None:
        raise InputError(
            f"model term {term!s} needs the {term.source.replace('_', ' ')} table, which was not given",
            where="survival",
            fix="give the rule that table, or remove the term",
        )
    return part


def _categorical(values: pd.Series, prefix: str, where: str) -> tuple[pd.DataFrame, str]:
    """One indicator per level but the reference (most frequent; ties: first in natural order)."""
    present = values.dropna()
    if present.nunique() > MAX_KM_GROUPS:
        raise InputError(
            f"{prefix} has {present.nunique()} distinct text values: too many levels for indicators",
            where=where,
            fix="use a numeric column, or recode it into a few categories",
        )
    counts = present.value_counts()
    levels = sorted(counts.index, key=lambda v: (-counts[v], _natural_key(v)))
    if not levels:
        return pd.DataFrame({prefix: np.nan}, index=values.index), "(no values)"
    reference = levels[0]
    # A single level still gets its (constant) indicator, so that the model reports it as dropped and why.
    indicated = sorted(levels[1:], key=_natural_key) if len(levels) > 1 else levels
    frame = pd.DataFrame(
        {f"{prefix}={level}": (values == level).astype(float).where(values.notna()) for level in indicated},
        index=values.index,
    )
    return frame, f"{prefix}={reference}"


def build_design(
    clinical: pd.DataFrame, features: SlideFeatures, terms: Iterable[Term], settings: SurvivalSettings
) -> Design:
    """Covariate columns for ``terms`` for the patients of ``clinical`` (its index). References (most frequent
    level, largest cluster, most abundant phenotype) are chosen on these patients, once, so that univariable and
    multivariable models compare against the same thing."""
    patients = clinical.index
    columns: dict[str, pd.Series] = {}
    design_terms: dict[str, DesignTerm] = {}
    for term in dict.fromkeys(terms):
        key = str(term)
        if key in design_terms:
            continue
        if term.kind == "clinical":
            if term.name not in clinical.columns:
                raise InputError(
                    f"model term {key}: the clinical table has no column {term.name!r} "
                    f"(columns: {', '.join(map(str, clinical.columns))})",
                    where="clinical table",
                    fix="correct the term or add the column",
                )
            numbers, text_cells = _numeric(clinical[term.name])
            if text_cells.any():
                values = clinical[term.name].astype(str).str.strip()
                values = values.where(~values.str.lower().isin(_MISSING))
                frame, reference = _categorical(values, key, where="clinical table")
                columns.update(frame.to_dict("series"))
                design_terms[key] = DesignTerm(term, list(frame.columns), f"{reference} (most frequent level)")
            else:
                columns[key] = numbers
                design_terms[key] = DesignTerm(term, [key], f"per unit of {term.name}")
        elif term.kind in ("subtype", "p"):
            calls = _need(features.calls, term, features)
            classes = [c[2:] for c in calls.columns if c.startswith("p_")]
            if term.name not in classes:
                raise InputError(
                    f"model term {key}: {term.name!r} is not a zero-shot class ({', '.join(classes)})",
                    where=features.sources.get("calls", "zero-shot calls"),
                    fix="use one of the prompt set's class names",
                )
            patient_calls_ = calls.reindex(patients)
            if term.kind == "p":
                columns[key] = patient_calls_[f"p_{term.name}"]
                design_terms[key] = DesignTerm(term, [key], "per unit probability (0 to 1)")
            else:
                call = patient_calls_["call"]
                called = call.notna() & call.ne("")
                columns[key] = (call == term.name).astype(float).where(called)
                others = [c for c in classes if c != term.name]
                design_terms[key] = DesignTerm(term, [key], f"zero-shot call {' or '.join(others)}")
        elif term.kind == "class_fraction":
            fractions = _need(features.class_fractions, term, features)
            columns[key] = _fraction_column(
                fractions, term, key, f"no tissue class {term.name!r} (classes: {', '.join(fractions.columns)})",
                where=features.sources.get("class_fractions", "class composition"),
                fix="use one of the named tissue classes",
            ).reindex(patients)  # fmt: skip
            design_terms[key] = DesignTerm(term, [key], "per unit fraction of tissue (0 to 1)")
        elif term.kind == "phenotype":
            fractions = _need(features.phenotypes, term, features)
            columns[key] = _fraction_column(
                fractions, term, key, f"no phenotype column {term.name!r} ({', '.join(fractions.columns)})",
                where=features.sources.get("phenotypes", "phenotype composition"),
                fix="use one of the phenotype columns",
            ).reindex(patients)  # fmt: skip
            design_terms[key] = DesignTerm(term, [key], "per unit fraction of tiles (0 to 1)")
        elif term.kind == "phenotypes":
            frame, reference = _phenotype_covariates(_need(features.phenotypes, term, features), patients, settings)
            columns.update(frame.to_dict("series"))
            design_terms[key] = DesignTerm(term, list(frame.columns), reference)
        elif term.kind == "cluster":
            cluster = _need(features.clusters, term, features).reindex(patients)
            counts = cluster.value_counts()
            if counts.empty:
                raise InputError(
                    "no patient has a slide cluster", where=features.sources.get("clusters"), fix="check the clustering"
                )
            labels = sorted(counts.index, key=lambda v: (-counts[v], _natural_key(v)))
            reference = labels[0]
            for label in sorted(labels[1:], key=_natural_key):
                columns[f"cluster:{label}"] = (cluster == label).astype(float).where(cluster.notna())
            design_terms[key] = DesignTerm(
                term,
                [f"cluster:{label}" for label in sorted(labels[1:], key=_natural_key)],
                f"cluster {reference} (largest)",
            )
    frame = pd.DataFrame(columns, index=patients, dtype=float)
    for key, design_term in design_terms.items():
        if frame[design_term.columns].isna().all().all():
            source = design_term.term.source
            raise InputError(
                f"model term {key} has no value for any of the {len(patients)} patients",
                where=features.sources.get(source, source) if source != "clinical" else "clinical table",
                fix="check that the table covers the cohort's patients (and, for subtype:, that not every call "
                "abstains), or remove the term",
            )
    return Design(frame, design_terms)


def _phenotype_covariates(
    fractions: pd.DataFrame, patients: pd.Index, settings: SurvivalSettings
) -> tuple[pd.DataFrame, str]:
    fractions = fractions.reindex(patients)
    phenotypes = list(fractions.columns)
    if len(phenotypes) < 2:
        raise InputError(
            f"the phenotype composition has {len(phenotypes)} phenotype column(s): a composition needs two or more",
            where="phenotype composition",
            fix="use phenotype:COLUMN for a single fraction",
        )
    reference = settings.phenotype_reference
    if reference is None:
        means = fractions.mean()
        reference = str(max(phenotypes, key=lambda c: (means[c] if pd.notna(means[c]) else -1.0, -phenotypes.index(c))))
    elif reference not in phenotypes:
        raise InputError(
            f"phenotype_reference {reference!r} is not a phenotype column ({', '.join(phenotypes)})",
            where="survival.phenotype_reference",
            fix="name one of the phenotype columns, or null for the most abundant",
        )
    others = [c for c in phenotypes if c != reference]
    if settings.phenotype_transform == "alr":
        c = settings.phenotype_pseudocount
        ratios = np.log((fractions[others] + c).div(fractions[reference] + c, axis=0))
        frame = ratios.rename(columns=lambda p: f"phenotypes:{p}")
        chosen = " (most abundant)" if settings.phenotype_reference is None else ""
        described = f"log-ratio to {reference}{chosen}, pseudo-count {c:g}"
    else:
        frame = fractions[others].rename(columns=lambda p: f"phenotypes:{p}")
        described = f"fraction moved from {reference}"
    return frame, described


# ---------------------------------------------------------------------------------------------- models


@dataclass
class CoxFit:
    """A fitted Cox model (``model`` is None when no covariate was left to fit) and what was dropped."""

    name: str
    model: Any
    data: pd.DataFrame
    covariates: list[str]
    dropped: dict[str, str]
    ph_p: dict[str, float]
    #: Said of the whole fit, e.g. that Newton–Raphson did not fully converge (copied into every row's note).
    model_note: str = ""

    @property
    def n(self) -> int:
        return len(self.data)

    @property
    def events(self) -> int:
        return int(self.data["event"].sum())


def _constant_note(values: pd.Series) -> str:
    unique = values.dropna().unique()
    return f"constant: every patient has {unique[0]:g}" if len(unique) else "no values"


def _lifelines_fit(frame: pd.DataFrame, settings: SurvivalSettings) -> tuple[Any, list[warnings.WarningMessage]]:
    from lifelines import CoxPHFitter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = CoxPHFitter(penalizer=settings.penalizer, l1_ratio=settings.l1_ratio)
        model.fit(frame, duration_col="time", event_col="event")
    return model, list(caught)


def fit_cox(
    data: pd.DataFrame,
    covariates: Sequence[str],
    *,
    name: str,
    settings: SurvivalSettings,
    check_ph: bool = True,
) -> CoxFit:
    """Fit a Cox model of ``time``/``event`` on ``covariates`` (rows with a missing value are the caller's to
    drop). Constant covariates are dropped with a warning; a fit that doesn't converge is an InputError naming
    the model and suggesting a penalizer; lifelines' own warnings are logged with the model's name."""
    from lifelines.exceptions import ConvergenceError

    frame = data[["time", "event", *covariates]].astype(float)
    dropped: dict[str, str] = {}
    kept = []
    for covariate in covariates:
        if frame[covariate].nunique() <= 1:
            dropped[covariate] = _constant_note(frame[covariate])
            log.warning("Cox model %s: covariate %s is dropped (%s)", name, covariate, dropped[covariate])
        else:
            kept.append(covariate)
    frame = frame[["time", "event", *kept]]
    if not kept:
        return CoxFit(name, None, frame, [], dropped, {})
    events = int(frame["event"].sum())
    if events < settings.min_events_per_covariate * len(kept):
        log.warning(
            "Cox model %s: %d event(s) for %d covariate(s) (%.1f per covariate, fewer than %g): estimates are "
            "unstable; use fewer covariates or a penalizer",
            name,
            events,
            len(kept),
            events / len(kept),
            settings.min_events_per_covariate,
        )
    try:
        model, caught = _lifelines_fit(frame, settings)
    except (ConvergenceError, np.linalg.LinAlgError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"the Cox model {name!r} ({', '.join(kept)}; {len(frame)} patients, {events} events) did not converge: "
            f"{first}",
            where="survival",
            fix="set survival.penalizer (e.g. 0.1) to shrink the coefficients, or remove collinear or nearly "
            "constant covariates",
        ) from exc
    from lifelines.exceptions import ConvergenceWarning

    model_note = ""
    for warning in caught:
        message = str(warning.message).strip().splitlines()[0]
        if issubclass(warning.category, ConvergenceWarning):
            model_note = "lifelines convergence warning: estimates may be unreliable; consider survival.penalizer"
            log.warning("Cox model %s: %s (consider survival.penalizer, e.g. 0.1)", name, message)
        else:
            log.warning("Cox model %s: %s", name, message)
    ph_p: dict[str, float] = {}
    if check_ph:
        ph_p = _ph_test(model, frame, name, settings)
    return CoxFit(name, model, frame, kept, dropped, ph_p, model_note)


def _ph_test(model: Any, frame: pd.DataFrame, name: str, settings: SurvivalSettings) -> dict[str, float]:
    """Schoenfeld-residual test per covariate (lifelines, rank of time); a failed test is NaN, not a crash."""
    from lifelines.statistics import proportional_hazard_test

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = proportional_hazard_test(model, frame, time_transform="rank")
        p = {str(k): float(v) for k, v in result.summary["p"].items()}
    except Exception as exc:  # noqa: BLE001  (a diagnostic must not take the analysis down)
        log.warning("Cox model %s: the proportional-hazards test failed (%s)", name, exc)
        return {}
    violated = [f"{k} (p = {v:.3g})" for k, v in p.items() if v < settings.ph_alpha]
    if violated:
        log.warning(
            "Cox model %s: proportional hazards doubtful for %s (Schoenfeld residual test, p < %g): the hazard "
            "ratio is an average over follow-up; consider stratifying or a time interaction",
            name,
            ", ".join(violated),
            settings.ph_alpha,
        )
    return p


COX_COLUMNS = [
    "endpoint",
    "analysis",
    "term",
    "covariate",
    "reference",
    "coef",
    "se",
    "hr",
    "hr_lower_95",
    "hr_upper_95",
    "p",
    "n",
    "events",
    "ph_test_p",
    "lr_test_p",
    "penalizer",
    "note",
]


def cox_table(fit: CoxFit, design: Design, terms: Sequence[Term], *, endpoint: str, analysis: str) -> pd.DataFrame:
    """One row per covariate of ``terms`` (dropped ones with NaN and a note): the columns of COX_COLUMNS."""
    summary = fit.model.summary if fit.model is not None else None
    lr_p = float("nan")
    if fit.model is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lr_p = float(fit.model.log_likelihood_ratio_test().p_value)
        except Exception:  # noqa: BLE001
            lr_p = float("nan")
    rows = []
    for term in terms:
        design_term = design.terms[str(term)]
        for covariate in design_term.columns:
            row: dict[str, Any] = {
                "endpoint": endpoint,
                "analysis": analysis,
                "term": str(term),
                "covariate": covariate,
                "reference": design_term.reference,
                "n": fit.n,
                "events": fit.events,
                "lr_test_p": lr_p,
                "penalizer": fit.model.penalizer if fit.model is not None else float("nan"),
                "note": "; ".join(filter(None, [fit.dropped.get(covariate, ""), fit.model_note])),
            }
            if summary is not None and covariate in summary.index:
                s = summary.loc[covariate]
                row |= {
                    "coef": s["coef"],
                    "se": s["se(coef)"],
                    "hr": s["exp(coef)"],
                    "hr_lower_95": s["exp(coef) lower 95%"],
                    "hr_upper_95": s["exp(coef) upper 95%"],
                    "p": s["p"],
                    "ph_test_p": fit.ph_p.get(covariate, float("nan")),
                }
            rows.append(row)
    return pd.DataFrame(rows, columns=COX_COLUMNS)


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
    from lifelines.exceptions import ConvergenceError
    from lifelines.utils import concordance_index

    frame = data[["time", "event", *covariates]].astype(float)
    event = frame["event"].to_numpy().astype(int)
    n, events = len(frame), int(event.sum())
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
        for repeat in range(settings.cv_repeats):
            folds = _stratified_folds(event, k, np.random.default_rng([settings.seed, repeat]))
            out_of_fold = np.full(n, np.nan)
            for fold in range(k):
                train, test = frame[folds != fold], frame[folds == fold]
                kept = [c for c in covariates if train[c].nunique() > 1]
                if not kept:
                    failed += 1
                    continue
                try:
                    model, _ = _lifelines_fit(train[["time", "event", *kept]], settings)
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


# --------------------------------------------------------------------------------------------- Kaplan–Meier

KM_COLUMNS = [
    "endpoint",
    "grouping",
    "group",
    "n",
    "events",
    "median_time",
    "time",
    "n_at_risk",
    "n_events",
    "n_censored",
    "survival",
    "ci_lower_95",
    "ci_upper_95",
]
LOGRANK_COLUMNS = [
    "endpoint",
    "grouping",
    "levels",
    "n_groups",
    "groups",
    "n",
    "events",
    "test_statistic",
    "df",
    "p",
    "note",
]


def kaplan_meier(
    data: pd.DataFrame, *, endpoint: str, grouping: str, order: Sequence[str] | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Kaplan–Meier curve per group (``data``: time, event, group) as a step table — one row at time 0 and one
    per distinct time, with numbers at risk, events, censored, survival and its 95 % interval (lifelines,
    exponential Greenwood) — and the multivariate log-rank test across the groups."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    data = data.dropna(subset=["time", "event", "group"])
    levels = list(order) if order is not None else sorted(data["group"].unique(), key=_natural_key)
    groups = [g for g in levels if (data["group"] == g).any()]
    frames = []
    for group in groups:
        subset = data[data["group"] == group]
        fitter = KaplanMeierFitter().fit(subset["time"], subset["event"], label="s")
        table = fitter.event_table
        ci = fitter.confidence_interval_
        frames.append(
            pd.DataFrame(
                {
                    "endpoint": endpoint,
                    "grouping": grouping,
                    "group": str(group),
                    "n": len(subset),
                    "events": int(subset["event"].sum()),
                    "median_time": float(fitter.median_survival_time_),
                    "time": table.index.to_numpy(dtype=float),
                    "n_at_risk": table["at_risk"].to_numpy(),
                    "n_events": table["observed"].to_numpy(),
                    "n_censored": table["censored"].to_numpy(),
                    "survival": fitter.survival_function_["s"].to_numpy(),
                    "ci_lower_95": ci["s_lower_0.95"].to_numpy(),
                    "ci_upper_95": ci["s_upper_0.95"].to_numpy(),
                }
            )
        )
    curves = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=KM_COLUMNS)
    test: dict[str, Any] = {
        "endpoint": endpoint,
        "grouping": grouping,
        "levels": "; ".join(str(g) for g in levels),
        "n_groups": len(groups),
        "groups": "; ".join(str(g) for g in groups),
        "n": len(data),
        "events": int(data["event"].sum()),
        "test_statistic": np.nan,
        "df": np.nan,
        "p": np.nan,
        "note": "",
    }
    if len(groups) < 2:
        test["note"] = f"one group only ({test['groups'] or 'none'}): no log-rank test"
        log.warning("Kaplan–Meier %s by %s: %s", endpoint, grouping, test["note"])
    else:
        result = multivariate_logrank_test(data["time"], data["group"].astype(str), data["event"])
        test |= {
            "test_statistic": float(result.test_statistic),
            "df": int(result.degrees_of_freedom),
            "p": float(result.p_value),
        }
    return curves[KM_COLUMNS], test


# ---------------------------------------------------------------------------------------------- the analysis


@dataclass(frozen=True)
class SurvivalInputs:
    """Where the analysis reads from: the clinical table, the sheet's slide → patient map, slide-level tables."""

    clinical: str | Path
    slide_patients: Mapping[str, str] | None = None
    calls: str | Path | None = None
    composition: str | Path | None = None
    class_composition: str | Path | None = None
    clusters: str | Path | None = None


@dataclass
class SurvivalResult:
    patients: pd.DataFrame
    univariable: pd.DataFrame
    multivariable: pd.DataFrame
    cindex: pd.DataFrame
    km: dict[str, pd.DataFrame]
    logrank: dict[str, pd.DataFrame]
    fits: dict[str, CoxFit] = field(default_factory=dict)


def _clinical_patients(inputs: SurvivalInputs) -> pd.DataFrame:
    from histoclip.sheets import read_clinical_table

    sheet_patients = sorted(set(inputs.slide_patients.values())) if inputs.slide_patients is not None else None
    table = read_clinical_table(inputs.clinical, sheet_patients)
    clinical = table.table.set_index("patient_id", drop=False)
    clinical.index.name = "patient_id"
    if table.missing_patients:
        log.warning(
            "%d patient(s) of the cohort sheet have no row in the clinical table %s and are left out of the "
            "survival analysis: %s",
            len(table.missing_patients),
            inputs.clinical,
            _ids(table.missing_patients, limit=200),
        )
    if sheet_patients is not None:
        without_slides = clinical.index.difference(pd.Index(sheet_patients))
        if len(without_slides):
            log.info(
                "%d patient(s) of the clinical table have no slide in the cohort sheet and are not analysed: %s",
                len(without_slides),
                _ids(without_slides),
            )
        clinical = clinical.loc[clinical.index.intersection(pd.Index(sheet_patients), sort=False)]
    return clinical


def _complete(frame: pd.DataFrame, columns: Sequence[str], *, model: str, endpoint: str) -> pd.DataFrame:
    missing = frame[list(columns)].isna().any(axis=1)
    if missing.any():
        log.warning(
            "%s (%s): %d patient(s) lack a covariate and are left out: %s",
            model,
            endpoint,
            int(missing.sum()),
            _ids(frame.index[missing]),
        )
    return frame[~missing]


def _group_labels(grouping: Term, clinical: pd.DataFrame, features: SlideFeatures) -> tuple[pd.Series, list[str]]:
    if grouping.kind == "subtype":
        calls = _need(features.calls, Term("subtype", "any"), features)
        classes = [c[2:] for c in calls.columns if c.startswith("p_")]
        call = calls["call"].reindex(clinical.index)
        abstained = call.eq("")
        if abstained.any():
            log.warning("Kaplan–Meier by subtype: %d patient(s) abstain and are left out", int(abstained.sum()))
        return call.where(~abstained), classes
    if grouping.kind == "cluster":
        cluster = _need(features.clusters, Term("cluster"), features).reindex(clinical.index)
        labels = sorted(cluster.dropna().unique(), key=_natural_key)
        return cluster.map(lambda v: f"cluster {v}" if pd.notna(v) else v), [f"cluster {v}" for v in labels]
    if grouping.name not in clinical.columns:
        raise InputError(
            f"Kaplan–Meier grouping {grouping!s}: the clinical table has no column {grouping.name!r}",
            where="clinical table",
            fix="correct survival.km_groupings",
        )
    values = clinical[grouping.name].astype(str).str.strip()
    values = values.where(~values.str.lower().isin(_MISSING))
    levels = sorted(values.dropna().unique(), key=_natural_key)
    if len(levels) > MAX_KM_GROUPS:
        raise InputError(
            f"Kaplan–Meier grouping {grouping!s} has {len(levels)} levels",
            where="clinical table",
            fix="group by a categorical column (continuous values need cut points first)",
        )
    return values, levels


def run_survival(inputs: SurvivalInputs, plan: SurvivalPlan) -> SurvivalResult:
    """The whole analysis of every endpoint: patient table, univariable and multivariable Cox, c-index, KM."""
    settings = plan.settings
    clinical = _clinical_patients(inputs)
    features = load_slide_features(
        slide_patients=inputs.slide_patients,
        calls=inputs.calls,
        composition=inputs.composition,
        class_composition=inputs.class_composition,
        clusters=inputs.clusters,
        abstain_margin=settings.abstain_margin,
    )
    if inputs.slide_patients is None:
        orphans = sorted(features.patients - set(clinical.index))
        if orphans:
            log.warning(
                "%d patient(s) with slide outputs have no row in the clinical table %s and are left out: %s",
                len(orphans),
                inputs.clinical,
                _ids(orphans, limit=200),
            )
    terms = list(dict.fromkeys([*plan.multivariable, *plan.univariable]))
    design = build_design(clinical, features, terms, settings)
    where = f"clinical table {inputs.clinical}"
    outcomes = {e.name: endpoint_frame(clinical, e, where=where) for e in plan.endpoints}

    patients = pd.DataFrame(index=clinical.index)
    for name, outcome in outcomes.items():
        patients[f"time_{name}"] = outcome["time"]
        patients[f"event_{name}"] = outcome["event"].astype("Int64")
    if features.calls is not None:
        patients["subtype_call"] = features.calls["call"].reindex(clinical.index)
    if features.clusters is not None:
        patients["cluster"] = features.clusters.reindex(clinical.index)
    patients = pd.concat([patients, design.frame], axis=1).rename_axis("patient_id").reset_index()

    uni_rows, multi_rows, cindex_rows = [], [], []
    fits: dict[str, CoxFit] = {}
    for endpoint in plan.endpoints:
        outcome = outcomes[endpoint.name]
        data = outcome.join(design.frame, how="left")
        for term in plan.univariable:
            columns = design.columns([term])
            subset = _complete(data, columns, model=f"univariable {term}", endpoint=endpoint.name)
            fit = fit_cox(subset, columns, name=f"univariable {term} ({endpoint.name})", settings=settings)
            fits[f"{endpoint.name}/univariable/{term}"] = fit
            uni_rows.append(cox_table(fit, design, [term], endpoint=endpoint.name, analysis="univariable"))
        if plan.multivariable:
            columns = design.columns(plan.multivariable)
            subset = _complete(data, columns, model="multivariable", endpoint=endpoint.name)
            name = f"multivariable ({endpoint.name})"
            if subset["event"].sum() == 0:
                raise InputError(
                    f"the {name} model has no events among the {len(subset)} patients with every covariate",
                    where=where,
                    fix="check which covariates are missing for which patients (patients.tsv)",
                )
            fit = fit_cox(subset, columns, name=name, settings=settings)
            if fit.model is None:
                raise InputError(
                    f"every covariate of the {name} model is constant over its {len(subset)} patients: "
                    + "; ".join(f"{k} {v}" for k, v in fit.dropped.items()),
                    where="survival.multivariable",
                    fix="the model has nothing to estimate: check the inputs (e.g. zero-shot calls that collapse "
                    "onto one class) or change the terms",
                )
            fits[f"{endpoint.name}/multivariable"] = fit
            multi_rows.append(
                cox_table(fit, design, plan.multivariable, endpoint=endpoint.name, analysis="multivariable")
            )
            for label, model_terms in _cindex_models(plan.multivariable):
                kept = [c for c in design.columns(model_terms) if c in fit.covariates]
                if not kept:
                    continue
                row = cross_validated_cindex(
                    subset,
                    kept,
                    name=f"{label} ({endpoint.name})",
                    settings=settings,
                    full_fit=fit if label == "multivariable" else _quiet_fit(subset, kept, settings),
                )
                cindex_rows.append(
                    row | {"endpoint": endpoint.name, "model": label, "terms": ", ".join(map(str, model_terms))}
                )
    km: dict[str, pd.DataFrame] = {}
    logrank: dict[str, pd.DataFrame] = {}
    for text in plan.groupings:
        grouping = parse_grouping(text)
        labels, order = _group_labels(grouping, clinical, features)
        curves, tests = [], []
        for endpoint in plan.endpoints:
            data = outcomes[endpoint.name].assign(group=labels.reindex(outcomes[endpoint.name].index))
            table, test = kaplan_meier(data, endpoint=endpoint.name, grouping=text, order=order)
            curves.append(table)
            tests.append(test)
        km[text] = pd.concat(curves, ignore_index=True)
        logrank[text] = pd.DataFrame(tests, columns=LOGRANK_COLUMNS)
    return SurvivalResult(
        patients=patients,
        univariable=_stack(uni_rows, COX_COLUMNS),
        multivariable=_stack(multi_rows, COX_COLUMNS),
        cindex=pd.DataFrame(cindex_rows, columns=CINDEX_COLUMNS),
        km=km,
        logrank=logrank,
        fits=fits,
    )


def _stack(frames: Sequence[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    """Row-wise union of same-column tables (records, so all-NaN columns of one part don't change dtypes)."""
    return pd.DataFrame([row for frame in frames for row in frame.to_dict("records")], columns=list(columns))


def _cindex_models(terms: Sequence[Term]) -> list[tuple[str, list[Term]]]:
    """The multivariable model, and — when it mixes clinical and slide-derived terms — each part alone, so that
    the table shows what the slides add to the clinic."""
    models = [("multivariable", list(terms))]
    clinical = [t for t in terms if t.kind == "clinical"]
    slide = [t for t in terms if t.kind != "clinical"]
    if clinical and slide:
        models += [("clinical terms only", clinical), ("slide terms only", slide)]
    return models


def _quiet_fit(data: pd.DataFrame, covariates: Sequence[str], settings: SurvivalSettings) -> CoxFit | None:
    """A full-data fit for the apparent c-index of a sub-model; failures only cost that one number."""
    try:
        model, _ = _lifelines_fit(data[["time", "event", *covariates]].astype(float), settings)
    except Exception:  # noqa: BLE001
        return None
    return CoxFit("sub-model", model, data, list(covariates), {}, {})


def write_survival(
    result: SurvivalResult,
    *,
    patients: str | Path,
    univariable: str | Path,
    multivariable: str | Path,
    cindex: str | Path,
    km: Mapping[str, str | Path],
    logrank: Mapping[str, str | Path],
) -> None:
    """Every table as TSV, atomically (histoclip.plots.write_tsv)."""
    from histoclip.plots import write_tsv

    write_tsv(result.patients, patients)
    write_tsv(result.univariable, univariable)
    write_tsv(result.multivariable, multivariable)
    write_tsv(result.cindex, cindex)
    for grouping, path in km.items():
        write_tsv(result.km[grouping], path)
    for grouping, path in logrank.items():
        write_tsv(result.logrank[grouping], path)


# -------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m histoclip.survival from-censorship IN OUT``: a CLAM/SurvPath table → our clinical table."""
    parser = argparse.ArgumentParser(prog="python -m histoclip.survival", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser(
        "from-censorship",
        help="convert a table with censorship (1 = censored), possibly one row per slide, to patient_id/time/event",
    )
    convert.add_argument("table", help="input table (.csv or TSV)")
    convert.add_argument("output", help="output clinical table (TSV)")
    convert.add_argument("--patient-column", default="case_id")
    convert.add_argument("--time-column", default="survival_months")
    convert.add_argument("--censorship-column", default="censorship")
    convert.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="NAME=TIME,CENSORSHIP",
        help="a further endpoint, written as time_NAME / event_NAME (e.g. dss=survival_months_dss,censorship_dss)",
    )
    args = parser.parse_args(argv)
    endpoints = {}
    for spec in args.endpoint:
        name, _, columns = spec.partition("=")
        time_col, _, censor_col = columns.partition(",")
        if not (name and time_col and censor_col):
            parser.error(f"--endpoint {spec!r}: write NAME=TIME_COLUMN,CENSORSHIP_COLUMN")
        endpoints[name] = (time_col, censor_col)
    path = Path(args.table)
    table = pd.read_csv(path, sep="," if path.suffix.lower() == ".csv" else "\t", dtype=str, keep_default_na=False)
    out = event_table_from_censorship(
        table,
        patient_column=args.patient_column,
        time_column=args.time_column,
        censorship_column=args.censorship_column,
        endpoints=endpoints,
        where=str(path),
    )
    from histoclip.plots import write_tsv

    write_tsv(out, args.output)
    print(f"{len(out)} patients, {int(out['event'].sum())} events -> {args.output}")
    return 0
