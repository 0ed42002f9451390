"""Site audit: do the results follow the hospital a slide came from rather than its tissue?

Stain, scanner and cutting differ between hospitals, foundation-model embeddings pick that up, and a cohort whose
subtypes or outcomes are unevenly spread over sites can then show a "finding" that is a site effect (Howard et al.
2021 showed TCGA models predicting the tissue source site). Four checks, one table (``site.tsv``) and one figure:

- **site prediction**: a ridge-penalised linear classifier (standardised inputs, fixed ``ridge_alpha``) predicts
  each slide's site from its slide embedding, out of fold (patient-level folds stratified by site, so no patient's
  slides are on both sides); its balanced accuracy with a bootstrap interval, against chance (1 / sites) and a
  permutation null (the whole cross-validation re-run with sites shuffled between patients: p = (1 + #null ≥
  observed) / (1 + permutations)). Well above chance means the embeddings encode the site.
- **clusters and phenotypes**: adjusted Rand index between the slide clusters and the sites, and between a k-means
  of the phenotype compositions (k = number of sites) and the sites, each with a permutation p. 0 is no agreement.
- **calls per site**: the share of each zero-shot call per site, with a chi-square test of independence.
- **Cox stratified by site**: the multivariable Cox model re-fitted with a baseline hazard per site (lifelines
  strata); a hazard ratio that moves much when stratified leans on between-site differences.

Rows: ``analysis``, ``quantity``, ``group``, ``value``, ``lower_95``, ``upper_95``, ``reference`` (chance, 0 or the
unstratified HR), ``p_value``, ``n``, ``note``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip.config import SectionSettings
from histoclip.mil.folds import patient_folds
from histoclip.zeroshot.evaluation import evaluate
from histoclip.zeroshot.fewshot import quiet_evaluation

__all__ = [
    "SITE_COLUMNS",
    "AuditSettings",
    "SiteAuditInputs",
    "calls_per_site",
    "cluster_agreement",
    "composition_agreement",
    "cox_by_site",
    "plot_site_audit",
    "run_site_audit",
    "site_prediction",
]

log = logging.getLogger(__name__)

SITE_COLUMNS = ["analysis", "quantity", "group", "value", "lower_95", "upper_95", "reference", "p_value", "n", "note"]


@dataclass(frozen=True)
class AuditSettings(SectionSettings, section="audit"):
    """Config ``audit`` plus the workflow seed."""

    site_from: str
    site_column: str
    folds: int
    ridge_alpha: float
    permutations: int
    n_bootstrap: int
    seed: int


def _row(analysis: str, quantity: str, value: float, **fields: Any) -> dict[str, Any]:
    return (
        {c: np.nan for c in SITE_COLUMNS}
        | {"analysis": analysis, "quantity": quantity, "group": "", "note": ""}
        | {"value": value}
        | fields
    )


def _p_value(observed: float, null: Sequence[float]) -> float:
    null = np.asarray(null, dtype=float)
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null))) if len(null) else np.nan


def _shuffled(patient_site: pd.Series, rng: np.random.Generator) -> pd.Series:
    """Sites shuffled between patients (a patient's slides keep sharing one site)."""
    return pd.Series(rng.permutation(patient_site.to_numpy()), index=patient_site.index)


def _out_of_fold(x: np.ndarray, patients: np.ndarray, patient_site: pd.Series, settings: AuditSettings) -> np.ndarray:
    """Each slide's site predicted by a model fitted on the other folds' patients."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.preprocessing import StandardScaler

    folds = patient_folds(patient_site, settings.folds, settings.seed, where="site audit", what="site")
    fold = folds.reindex(patients).to_numpy()
    y = patient_site.reindex(patients).to_numpy()
    predicted = np.empty(len(y), dtype=object)
    for f in range(int(fold.max()) + 1):
        train, test = fold != f, fold == f
        scaler = StandardScaler().fit(x[train])
        model = RidgeClassifier(alpha=settings.ridge_alpha).fit(scaler.transform(x[train]), y[train])
        predicted[test] = model.predict(scaler.transform(x[test]))
    return predicted


def site_prediction(
    embeddings: np.ndarray, patients: Sequence[str], patient_site: pd.Series, settings: AuditSettings
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Cross-validated balanced accuracy of predicting the site from slide embeddings (rows of ``embeddings``,
    one per slide of ``patients``), vs chance and a permutation null; and the facts for the figure."""
    patients = np.asarray(list(patients))
    sites = sorted(patient_site.unique())
    truth = patient_site.reindex(patients).to_numpy()
    predicted = _out_of_fold(embeddings, patients, patient_site, settings)
    with quiet_evaluation():
        result = evaluate(
            list(truth), list(predicted), None, sites, n_bootstrap=settings.n_bootstrap, seed=settings.seed
        )
        observed = result["balanced_accuracy"]
        rng = np.random.default_rng([settings.seed, 11])
        null = []
        for _ in range(settings.permutations):
            shuffled = _shuffled(patient_site, rng)
            guess = _out_of_fold(embeddings, patients, shuffled, settings)
            null.append(
                evaluate(list(shuffled.reindex(patients)), list(guess), None, sites, n_bootstrap=0)["balanced_accuracy"]
            )
    chance = 1.0 / len(sites)
    ci = result["ci"]["balanced_accuracy"]
    row = _row(
        "site_prediction",
        "balanced_accuracy",
        observed,
        lower_95=ci["low"],
        upper_95=ci["high"],
        reference=chance,
        p_value=_p_value(observed, null),
        n=len(truth),
        note=f"ridge classifier on slide embeddings, {len(sites)} sites, out of fold; reference = chance; "
        f"p from {len(null)} permutations",
    )
    recall = [
        _row("site_prediction", "recall", r, group=site, n=int((truth == site).sum()))
        for site, r in result["per_class_recall"].items()
    ]
    return [row, *recall], {"observed": observed, "null": null, "chance": chance, "ci": (ci["low"], ci["high"])}


def _ari_with_null(labels: np.ndarray, slide_patients: np.ndarray, patient_site: pd.Series, settings: AuditSettings):
    from sklearn.metrics import adjusted_rand_score

    sites = patient_site.reindex(slide_patients).to_numpy()
    observed = float(adjusted_rand_score(sites, labels))
    rng = np.random.default_rng([settings.seed, 12])
    null = [
        float(adjusted_rand_score(_shuffled(patient_site, rng).reindex(slide_patients).to_numpy(), labels))
        for _ in range(settings.permutations)
    ]
    return observed, null


def cluster_agreement(
    clusters: pd.Series, slide_patients: Mapping[str, str], patient_site: pd.Series, settings: AuditSettings
) -> tuple[dict[str, Any], list[float]]:
    """ARI between slide clusters (slide id → cluster; slides without one left out) and sites."""
    clusters = clusters.dropna()
    clusters = clusters[clusters.index.map(lambda s: slide_patients.get(s) in patient_site.index)]
    owners = np.array([slide_patients[s] for s in clusters.index])
    note = f"{clusters.nunique()} slide clusters vs sites"
    return _agreement_row("slide_clusters", clusters.to_numpy(), owners, patient_site, settings, note)


def composition_agreement(
    composition: pd.DataFrame, slide_patients: Mapping[str, str], patient_site: pd.Series, settings: AuditSettings
) -> tuple[dict[str, Any], list[float]]:
    """ARI between a k-means of the phenotype compositions (slide id → fractions; k = number of sites; square
    roots, i.e. the Hellinger geometry the slide clustering uses) and the sites."""
    from sklearn.cluster import KMeans

    composition = composition[composition.index.map(lambda s: slide_patients.get(s) in patient_site.index)].dropna()
    owners = np.array([slide_patients[s] for s in composition.index])
    k = patient_site.nunique()
    labels = KMeans(k, n_init=10, random_state=settings.seed).fit_predict(np.sqrt(composition.to_numpy().clip(0)))
    note = f"k-means (k = {k} sites) of the phenotype compositions vs sites"
    return _agreement_row("phenotype_composition", labels, owners, patient_site, settings, note)


def _agreement_row(
    analysis: str,
    labels: np.ndarray,
    owners: np.ndarray,
    patient_site: pd.Series,
    settings: AuditSettings,
    note: str,
) -> tuple[dict[str, Any], list[float]]:
    """The ARI row of slide ``labels`` (their patients: ``owners``) against the sites, with its permutation p, and
    the null ARIs."""
    observed, null = _ari_with_null(labels, owners, patient_site, settings)
    row = _row(
        analysis,
        "adjusted_rand_index",
        observed,
        reference=0.0,
        p_value=_p_value(observed, null),
        n=len(labels),
        note=f"{note}; p from {len(null)} permutations",
    )
    return row, null


def calls_per_site(calls: pd.DataFrame, slide_site: pd.Series) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Share of each zero-shot call per site (answered slides), and a chi-square test of independence."""
    from scipy.stats import chi2_contingency

    answered = calls[calls["call"].astype(str) != ""]
    answered = answered[answered["slide_id"].map(lambda s: slide_site.get(s, "") != "")]
    table = pd.crosstab(answered["slide_id"].map(slide_site), answered["call"])
    rows = [
        _row(
            "calls_per_site", cls, table.loc[site, cls] / table.loc[site].sum(), group=site, n=int(table.loc[site, cls])
        )
        for site in table.index
        for cls in table.columns
    ]
    if table.shape[0] > 1 and table.shape[1] > 1:
        test = chi2_contingency(table.to_numpy())
        rows.append(
            _row(
                "calls_per_site",
                "chi_square",
                float(test.statistic),
                p_value=float(test.pvalue),
                n=int(table.to_numpy().sum()),
                note=f"independence of call and site, {test.dof} df",
            )
        )
    return rows, table


def cox_by_site(
    patients: pd.DataFrame, cox: pd.DataFrame, patient_site: pd.Series, *, penalizer: float
) -> list[dict[str, Any]]:
    """Per endpoint, the multivariable Cox model's covariates re-fitted with a baseline hazard per site: the
    stratified HR with its 95 % interval, and the unstratified one (refitted on the same patients) as reference."""
    from lifelines import CoxPHFitter

    rows = []
    fitted = cox[cox["fitted"].astype(str).str.lower() == "true"] if "fitted" in cox.columns else cox
    for endpoint in dict.fromkeys(cox["endpoint"]):
        if endpoint not in set(fitted["endpoint"]):
            note = "the multivariable Cox model was not fitted (cox_multivariable.tsv says why): nothing to stratify"
            rows.append(_row("cox_stratified_by_site", "not fitted", np.nan, group=str(endpoint), note=note))
    for endpoint, group in fitted.groupby("endpoint", sort=False):
        covariates = [c for c in dict.fromkeys(group["covariate"]) if c in patients.columns]
        time, event = f"time_{endpoint}", f"event_{endpoint}"
        if not covariates or time not in patients.columns:
            continue
        frame = patients.set_index("patient_id")[[time, event, *covariates]].join(
            patient_site.rename("site"), how="inner"
        )
        frame = frame.dropna().rename(columns={time: "time", event: "event"})
        fits = {}
        for stratified in (False, True):
            model = CoxPHFitter(penalizer=penalizer)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    data = frame if stratified else frame.drop(columns="site")
                    model.fit(data, duration_col="time", event_col="event", strata=["site"] if stratified else None)
                fits[stratified] = model.summary
            except Exception as exc:  # noqa: BLE001 (a sensitivity analysis must not take the audit down)
                log.warning(
                    "Cox model of %s %s by site could not be fitted: %s",
                    endpoint,
                    "stratified" if stratified else "",
                    exc,
                )
        if True not in fits:
            continue
        for covariate in covariates:
            s = fits[True].loc[covariate]
            plain = fits[False].loc[covariate, "exp(coef)"] if False in fits else np.nan
            rows.append(
                _row(
                    "cox_stratified_by_site",
                    covariate,
                    float(s["exp(coef)"]),
                    group=str(endpoint),
                    lower_95=float(s["exp(coef) lower 95%"]),
                    upper_95=float(s["exp(coef) upper 95%"]),
                    reference=float(plain),
                    p_value=float(s["p"]),
                    n=len(frame),
                    note="hazard ratio with a baseline hazard per site; reference = without strata",
                )
            )
    return rows


def plot_site_audit(
    table: pd.DataFrame, facts: Mapping[str, Any], stem: str | Path, style: Any, *, title: str
) -> list[Path]:
    """Four panels: site prediction vs chance and its permutation null; ARIs with their nulls; calls per site;
    hazard ratios with and without site strata."""
    from histoclip.plots import class_colours, new_figure, save_figure

    figure = new_figure(style, width_in=max(style.width_in, 9.0), height_in=max(style.height_in, 6.5))
    with style.context():
        axes = figure.subplots(2, 2).ravel()
        ax = axes[0]
        prediction = facts.get("prediction")
        if prediction:
            if prediction["null"]:
                ax.hist(prediction["null"], bins=20, color="0.75", label="sites shuffled")
            ax.axvline(prediction["chance"], color="0.4", linestyle=":", label="chance")
            ax.axvline(prediction["observed"], color="C3", label="observed")
            ax.axvspan(*prediction["ci"], color="C3", alpha=0.15)
            ax.legend(frameon=False, fontsize=style.font_size - 2)
        ax.set_xlabel("balanced accuracy predicting the site")
        ax.set_title("site from slide embeddings")
        ax = axes[1]
        aris = table[table["quantity"] == "adjusted_rand_index"]
        for i, row in enumerate(aris.itertuples()):
            null = facts.get(f"null_{row.analysis}", [])
            if null:
                ax.plot([i, i], np.percentile(null, [2.5, 97.5]), color="0.6", linewidth=6, alpha=0.6)
            ax.plot(i, row.value, "o", color="C3")
        ax.axhline(0, color="0.6", linestyle=":", linewidth=0.8)
        ax.set_xticks(range(len(aris)), [a.replace("_", " ") for a in aris["analysis"]])
        ax.set_ylabel("ARI with site (grey: shuffled)")
        ax.set_title("clusters and phenotypes vs site")
        ax = axes[2]
        shares = table[(table["analysis"] == "calls_per_site") & (table["quantity"] != "chi_square")]
        if len(shares):
            pivot = shares.pivot(index="group", columns="quantity", values="value").fillna(0)
            colours = class_colours(list(pivot.columns))
            bottom = np.zeros(len(pivot))
            for cls in pivot.columns:
                ax.bar(pivot.index, pivot[cls], bottom=bottom, color=colours[cls], label=cls)
                bottom += pivot[cls].to_numpy()
            ax.legend(frameon=False, fontsize=style.font_size - 2)
        ax.set_ylabel("share of zero-shot calls")
        ax.set_title("calls per site")
        ax = axes[3]
        cox = table[(table["analysis"] == "cox_stratified_by_site") & table["value"].notna()]
        for i, row in enumerate(cox.itertuples()):
            ax.plot([row.lower_95, row.upper_95], [i, i], color="C0")
            ax.plot(row.value, i, "o", color="C0", label="stratified by site" if i == 0 else None)
            ax.plot(row.reference, i, "x", color="C1", label="not stratified" if i == 0 else None)
        if len(cox):
            ax.set_xscale("log")
            ax.set_yticks(range(len(cox)), [f"{q} ({g})" for q, g in zip(cox["quantity"], cox["group"], strict=True)])
            ax.axvline(1, color="0.6", linestyle=":", linewidth=0.8)
            ax.legend(frameon=False, fontsize=style.font_size - 2)
        ax.set_xlabel("hazard ratio")
        ax.set_title("Cox model with a baseline hazard per site")
        for ax, empty in zip(axes, [not prediction, aris.empty, shares.empty, cox.empty], strict=True):
            if empty:
                ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes, color="0.5")
        figure.suptitle(title)
    return save_figure(figure, stem, style, data=table, title=title)


@dataclass(frozen=True)
class SiteAuditInputs:
    """The files the audit reads; all but the sheet and the slide embeddings are optional (their checks are
    left out, with a note, when not given)."""

    sheet: str | Path
    slides: str | Path
    clusters: str | Path | None = None
    composition: str | Path | None = None
    calls: str | Path | None = None
    patients: str | Path | None = None
    cox: str | Path | None = None


def run_site_audit(
    inputs: SiteAuditInputs, settings: AuditSettings, *, cox_penalizer: float = 0.0
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every check whose inputs are given: the site table (SITE_COLUMNS) and the facts its figure draws."""
    from histoclip import formats
    from histoclip.audit.sites import patient_sites, site_column
    from histoclip.errors import InputError
    from histoclip.sheets import sheet_frame

    sheet = sheet_frame(inputs.sheet)
    where = f"cohort sheet {inputs.sheet}"
    slide_site = site_column(sheet, site_from=settings.site_from, column=settings.site_column, where=where)
    slide_patients = dict(zip(sheet["slide_id"].astype(str), sheet["patient_id"].astype(str), strict=True))
    known = slide_site[slide_site != ""]
    patient_site = patient_sites(known, [slide_patients[s] for s in known.index])
    if patient_site.nunique() < 2:
        raise InputError(
            f"the site audit needs at least 2 sites, found {sorted(patient_site.unique())}",
            where=where,
            fix="give the slides of each hospital their site (sheet column site)",
        )
    rows: list[dict[str, Any]] = []
    facts: dict[str, Any] = {"sites": sorted(patient_site.unique())}
    frame, matrix = formats.read_slide_embeddings(inputs.slides)
    ok = ~np.isnan(matrix).any(axis=1) & frame["slide_id"].astype(str).isin(known.index).to_numpy()
    found, facts["prediction"] = site_prediction(
        matrix[ok], [slide_patients[s] for s in frame.loc[ok, "slide_id"].astype(str)], patient_site, settings
    )
    rows += found
    if inputs.clusters is not None:
        table = formats.read_slide_tsv(inputs.clusters, kind="slide clusters", required=["slide_id", "cluster"])
        clusters = table.set_index("slide_id")["cluster"].replace("", np.nan)
        row, facts["null_slide_clusters"] = cluster_agreement(clusters, slide_patients, patient_site, settings)
        rows.append(row)
    if inputs.composition is not None:
        table = formats.read_composition(inputs.composition).set_index("slide_id")
        columns = [c for c in table.columns if c.startswith(formats.PHENOTYPE_PREFIX)]
        row, facts["null_phenotype_composition"] = composition_agreement(
            table[columns].astype(float), slide_patients, patient_site, settings
        )
        rows.append(row)
    if inputs.calls is not None:
        found, _ = calls_per_site(formats.read_calls(inputs.calls), slide_site)
        rows += found
    if inputs.patients is not None and inputs.cox is not None:
        patients = pd.read_csv(inputs.patients, sep="\t", dtype={"patient_id": str})
        rows += cox_by_site(patients, pd.read_csv(inputs.cox, sep="\t"), patient_site, penalizer=cox_penalizer)
    return pd.DataFrame(rows, columns=SITE_COLUMNS), facts
