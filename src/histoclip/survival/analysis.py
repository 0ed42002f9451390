"""The survival analysis of a slide cohort, from the clinical table and slide outputs to every table it writes.

Why this stage exists: the point of a slide cohort study is usually whether something seen in the slides (a
zero-shot subtype, how much necrosis, which cluster) predicts outcome beyond what the clinic already knows. That
needs the slide outputs turned into one row per patient, a model that names its covariates in the field's words,
and every result reported with its uncertainty and its assumptions checked. This module runs the steps in order:
the patients (clinical rows of the cohort sheet's patients; those without a clinical row are left out with a
warning naming them), their slide features, the design, the endpoints, the Cox models and c-indices, the
Kaplan–Meier tables.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from histoclip.errors import InputError
from histoclip.survival.cells import id_list
from histoclip.survival.cindex import CINDEX_COLUMNS, cindex_rows
from histoclip.survival.clinical import read_clinical_table
from histoclip.survival.cox import COX_COLUMNS, CoxFit, cox_table, fit_cox
from histoclip.survival.endpoints import endpoint_frame
from histoclip.survival.groupings import group_labels, parse_grouping
from histoclip.survival.km import LOGRANK_COLUMNS, kaplan_meier
from histoclip.survival.patients import SlideFeatures, load_slide_features
from histoclip.survival.plan import SurvivalPlan
from histoclip.survival.terms import Design, build_design

log = logging.getLogger(__name__)

__all__ = ["SurvivalInputs", "SurvivalResult", "run_survival", "write_survival"]


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
    """Every table of the analysis (as written), and the fitted Cox models by endpoint/analysis[/term]."""

    patients: pd.DataFrame
    univariable: pd.DataFrame
    multivariable: pd.DataFrame
    cindex: pd.DataFrame
    km: dict[str, pd.DataFrame]
    logrank: dict[str, pd.DataFrame]
    fits: dict[str, CoxFit] = field(default_factory=dict)


def _clinical_patients(inputs: SurvivalInputs, plan: SurvivalPlan) -> pd.DataFrame:
    sheet_patients = sorted(set(inputs.slide_patients.values())) if inputs.slide_patients is not None else None
    table = read_clinical_table(inputs.clinical, sheet_patients, layout=plan.layout)
    clinical = table.table
    _check_slide_level(plan, table.slide_level_columns, inputs.clinical)
    if table.missing_patients:
        log.warning(
            "%d patient(s) of the cohort sheet have no row in the clinical table %s and are left out of the "
            "survival analysis: %s",
            len(table.missing_patients),
            inputs.clinical,
            id_list(table.missing_patients, limit=200),
        )
    if sheet_patients is not None:
        without_slides = clinical.index.difference(pd.Index(sheet_patients))
        if len(without_slides):
            log.info(
                "%d patient(s) of the clinical table have no slide in the cohort sheet and are not analysed: %s",
                len(without_slides),
                id_list(without_slides),
            )
        clinical = clinical.loc[clinical.index.intersection(pd.Index(sheet_patients), sort=False)]
    return clinical


def _check_slide_level(plan: SurvivalPlan, slide_level: Sequence[str], path: str | Path) -> None:
    """A clinical term or grouping must not read a column the reader dropped because it differs between a
    patient's rows: say that, rather than "no such column"."""
    named = [str(t) for t in (*plan.multivariable, *plan.univariable) if t.source == "clinical"]
    named += [g for g in plan.groupings if g.startswith("clinical:")]
    clashes = sorted({n for n in named if n.partition(":")[2] in slide_level})
    if clashes:
        raise InputError(
            f"{', '.join(clashes)} read(s) a column that differs between rows of one patient (a slide-level column, "
            "dropped: one value per patient is needed)",
            where=f"clinical table {path}",
            fix="give the column one value per patient, or remove the term",
        )


def _complete(frame: pd.DataFrame, columns: Sequence[str], *, model: str, endpoint: str) -> pd.DataFrame:
    missing = frame[list(columns)].isna().any(axis=1)
    if missing.any():
        log.warning(
            "%s (%s): %d patient(s) lack a covariate and are left out: %s",
            model,
            endpoint,
            int(missing.sum()),
            id_list(frame.index[missing]),
        )
    return frame[~missing]


def run_survival(inputs: SurvivalInputs, plan: SurvivalPlan) -> SurvivalResult:
    """The whole analysis of every endpoint: patient table, univariable and multivariable Cox, c-index, KM."""
    settings = plan.settings
    clinical = _clinical_patients(inputs, plan)
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
                id_list(orphans, limit=200),
            )
    terms = list(dict.fromkeys([*plan.multivariable, *plan.univariable]))
    design = build_design(clinical, features, terms, settings)
    where = f"clinical table {inputs.clinical}"
    outcomes = {e.name: endpoint_frame(clinical, e, where=where) for e in plan.endpoints}
    patients = _patient_table(clinical, outcomes, features, design)

    uni_rows, multi_rows, cindex = [], [], []
    fits: dict[str, CoxFit] = {}
    for endpoint in plan.endpoints:
        data = outcomes[endpoint.name].join(design.frame, how="left")
        for term in plan.univariable:
            columns = design.columns([term])
            subset = _complete(data, columns, model=f"univariable {term}", endpoint=endpoint.name)
            fit = fit_cox(subset, columns, name=f"univariable {term} ({endpoint.name})", settings=settings)
            fits[f"{endpoint.name}/univariable/{term}"] = fit
            uni_rows.append(cox_table(fit, design, [term], endpoint=endpoint.name, analysis="univariable"))
        if plan.multivariable:
            subset, fit = _multivariable_fit(data, design, plan, endpoint=endpoint.name, where=where)
            fits[f"{endpoint.name}/multivariable"] = fit
            multi_rows.append(
                cox_table(fit, design, plan.multivariable, endpoint=endpoint.name, analysis="multivariable")
            )
            cindex += cindex_rows(subset, fit, design, plan.multivariable, endpoint=endpoint.name, settings=settings)
        _say_patient_sets(fits, endpoint.name)
    km, logrank = _km_tables(plan, clinical, features, outcomes)
    return SurvivalResult(
        patients=patients,
        univariable=_stack(uni_rows, COX_COLUMNS),
        multivariable=_stack(multi_rows, COX_COLUMNS),
        cindex=pd.DataFrame(cindex, columns=CINDEX_COLUMNS),
        km=km,
        logrank=logrank,
        fits=fits,
    )


def _say_patient_sets(fits: Mapping[str, CoxFit], endpoint: str) -> None:
    """One warning when an endpoint's models were fitted on different numbers of patients (each model uses the
    patients that have all its covariates), so that univariable and multivariable rows side by side — on one
    forest plot — are not read as the same patients."""
    models = {key.removeprefix(f"{endpoint}/"): fit for key, fit in fits.items() if key.startswith(f"{endpoint}/")}
    if len({fit.n for fit in models.values()}) > 1:
        sizes = [f"{key.replace('/', ' ')} n = {fit.n} ({fit.events} events)" for key, fit in models.items()]
        log.warning(
            "endpoint %s: the models use different patients (each uses those with all its covariates): %s; "
            "the n and events columns of the Cox tables, and the forest plot, give each model's",
            endpoint,
            "; ".join(sizes),
        )


def _patient_table(
    clinical: pd.DataFrame, outcomes: Mapping[str, pd.DataFrame], features: SlideFeatures, design: Design
) -> pd.DataFrame:
    """patients.tsv: every endpoint's time and event, the zero-shot call and cluster, every covariate column."""
    patients = pd.DataFrame(index=clinical.index)
    for name, outcome in outcomes.items():
        patients[f"time_{name}"] = outcome["time"]
        patients[f"event_{name}"] = outcome["event"].astype("Int64")
    if features.calls is not None:
        patients["subtype_call"] = features.calls["call"].reindex(clinical.index)
    if features.clusters is not None:
        patients["cluster"] = features.clusters.reindex(clinical.index)
    return pd.concat([patients, design.frame], axis=1).rename_axis("patient_id").reset_index()


def _multivariable_fit(
    data: pd.DataFrame, design: Design, plan: SurvivalPlan, *, endpoint: str, where: str
) -> tuple[pd.DataFrame, CoxFit]:
    """The multivariable model of one endpoint on its complete cases (returned with the fit, for the c-index);
    a model with no events or nothing left to estimate is an error, since every later table would be empty."""
    columns = design.columns(plan.multivariable)
    subset = _complete(data, columns, model="multivariable", endpoint=endpoint)
    name = f"multivariable ({endpoint})"
    if subset["event"].sum() == 0:
        raise InputError(
            f"the {name} model has no events among the {len(subset)} patients with every covariate",
            where=where,
            fix="check which covariates are missing for which patients (patients.tsv)",
        )
    fit = fit_cox(subset, columns, name=name, settings=plan.settings)
    if fit.model is None and not fit.refused:
        raise InputError(
            f"every covariate of the {name} model is constant over its {len(subset)} patients: "
            + "; ".join(f"{k} {v}" for k, v in fit.dropped.items()),
            where="survival.multivariable",
            fix="the model has nothing to estimate: check the inputs (e.g. zero-shot calls that collapse "
            "onto one class) or change the terms",
        )
    return subset, fit


def _km_tables(
    plan: SurvivalPlan, clinical: pd.DataFrame, features: SlideFeatures, outcomes: Mapping[str, pd.DataFrame]
) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """Kaplan–Meier step tables and log-rank tests of every grouping, every endpoint's rows stacked per grouping."""
    km: dict[str, pd.DataFrame] = {}
    logrank: dict[str, pd.DataFrame] = {}
    for text in plan.groupings:
        labels, order = group_labels(parse_grouping(text), clinical, features)
        curves, tests = [], []
        for endpoint in plan.endpoints:
            data = outcomes[endpoint.name].assign(group=labels.reindex(outcomes[endpoint.name].index))
            table, test = kaplan_meier(data, endpoint=endpoint.name, grouping=text, order=order)
            curves.append(table)
            tests.append(test)
        km[text] = pd.concat(curves, ignore_index=True)
        logrank[text] = pd.DataFrame(tests, columns=LOGRANK_COLUMNS)
    return km, logrank


def _stack(frames: Sequence[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    """Row-wise union of same-column tables (records, so all-NaN columns of one part don't change dtypes)."""
    return pd.DataFrame([row for frame in frames for row in frame.to_dict("records")], columns=list(columns))


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
