"""Image + clinical survival: do the slides add to what the clinic already knows?

Three Cox models of each endpoint are compared by cross-validated Harrell's c-index **on the same folds** (the
folds :mod:`histoclip.survival.cindex` deals: stratified by event, ``cv_repeats`` × ``cv_folds``, seeded by the
workflow seed) and on the same patients (those with an outcome, every clinical covariate and a slide embedding):

- **clinical**: the clinical covariates (``survival.multimodal.clinical``, or the ``clinical:`` terms of the
  multivariable model), standardised, penalised only by ``survival.penalizer``;
- **image**: an image risk score, a ridge-penalised Cox model on the patients' slide embeddings (the mean of their
  slides' embeddings) reduced to ``n_components`` principal components;
- **combined**: both, the clinical covariates penalised as in the clinical model and the components as in the
  image model.

**Why penalised Cox on PCA components, not MIL with a Cox loss.** A few hundred patients with a few dozen events
per fold cannot train an attention network's thousands of weights against a partial likelihood without
over-fitting; a handful of components with a ridge penalty is a model their events can support, its fit is
deterministic and takes seconds on a laptop, and it reads the slide embeddings the workflow already has. The
components are the directions along which this cohort's slides differ most, so they keep what tissue type,
amount of necrosis or stain do to the embeddings, and the penalty keeps their hazard ratios modest.

**Nothing is fitted on a test fold.** Every step that learns from data is fitted on the training fold only:
centring and PCA of the embeddings, standardising the components and the clinical covariates, and the choice of
the penalty (the best mean c-index over ``inner_folds`` folds of the training fold, each of which re-fits its own
PCA). The test fold's patients are transformed with those fitted values and scored by x·β. PCA fitted on all
patients before the split would have seen the test patients' embeddings and give the image model an optimistic
c-index; so would a penalty picked by the test folds' c-index. :func:`fit_fold` takes only training rows, which
is what the tests check (changing a fold's test rows leaves that fold's fitted transforms and models unchanged).

Reported per model: the mean c-index over held-out folds with the 2.5–97.5th percentile of the fold values (the
spread of the held-out estimate, as in ``cindex.tsv``), the pooled out-of-fold c-index per repeat, and for the
image and combined models the per-fold difference to the clinical model (same folds, so a paired difference).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip import formats
from histoclip.config import SectionSettings
from histoclip.errors import InputError
from histoclip.survival.cindex import _stratified_folds
from histoclip.survival.clinical import read_clinical_table
from histoclip.survival.endpoints import endpoint_frame
from histoclip.survival.patients import SlideFeatures
from histoclip.survival.plan import SurvivalPlan
from histoclip.survival.terms import build_design, parse_term

__all__ = [
    "MULTIMODAL_COLUMNS",
    "FoldFit",
    "ImageReducer",
    "MultimodalSettings",
    "cross_validated_multimodal",
    "fit_fold",
    "multimodal_data",
    "plot_multimodal",
    "run_multimodal",
]

log = logging.getLogger(__name__)

MODELS = ("clinical", "image", "combined")

MULTIMODAL_COLUMNS = [
    "endpoint",
    "model",
    "covariates",
    "n",
    "events",
    "folds",
    "repeats",
    "c_index",
    "c_index_lower_95",
    "c_index_upper_95",
    "c_index_pooled",
    "valid_folds",
    "failed_folds",
    "n_components",
    "penalizer_median",
    "delta_vs_clinical",
    "delta_lower_95",
    "delta_upper_95",
    "note",
]


@dataclass(frozen=True)
class MultimodalSettings(SectionSettings, section="survival.multimodal"):
    """Config ``survival.multimodal``."""

    clinical: tuple[str, ...] | None
    n_components: int
    penalizers: tuple[float, ...]
    inner_folds: int

    def __post_init__(self) -> None:
        if self.clinical is not None:
            object.__setattr__(self, "clinical", tuple(self.clinical))
        object.__setattr__(self, "penalizers", tuple(float(p) for p in self.penalizers))


@dataclass(frozen=True)
class ImageReducer:
    """Centring, PCA and standardisation of slide embeddings, fitted on one set of patients."""

    mean: np.ndarray
    components: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, n_components: int) -> ImageReducer:
        """PCA by SVD of the centred rows; each component's sign fixed (largest loading positive) so the same rows
        give the same reducer; scores standardised to unit variance on these rows."""
        mean = x.mean(axis=0)
        centred = x - mean
        m = max(1, min(n_components, len(x) - 2, x.shape[1]))
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        components = vt[:m]
        signs = np.sign(components[np.arange(m), np.argmax(np.abs(components), axis=1)])
        components = components * signs[:, None]
        scores = centred @ components.T
        scale = scores.std(axis=0, ddof=1)
        return cls(mean, components, np.where(scale > 0, scale, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) @ self.components.T) / self.scale

    @property
    def names(self) -> list[str]:
        return [f"image_pc{i + 1}" for i in range(len(self.components))]


@dataclass(frozen=True)
class Standardiser:
    """Clinical covariates centred and scaled by their training-fold mean and standard deviation."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        scale = x.std(axis=0, ddof=1) if len(x) > 1 else np.ones(x.shape[1])
        return cls(x.mean(axis=0), np.where(scale > 0, scale, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


@dataclass
class FoldFit:
    """Everything one training fold fitted: transforms, chosen penalties and each model's coefficients (None where
    the model could not be fitted)."""

    clinical_scaler: Standardiser | None
    reducer: ImageReducer
    penalizer: dict[str, float] = field(default_factory=dict)
    coefficients: dict[str, np.ndarray | None] = field(default_factory=dict)

    def risk(self, model: str, clinical: np.ndarray, image: np.ndarray) -> np.ndarray | None:
        """x·β of ``model`` for rows (untransformed clinical covariates and embeddings)."""
        beta = self.coefficients.get(model)
        if beta is None:
            return None
        return _features(model, self.clinical_scaler, self.reducer, clinical, image) @ beta


def _features(
    model: str, scaler: Standardiser | None, reducer: ImageReducer, clinical: np.ndarray, image: np.ndarray
) -> np.ndarray:
    parts = []
    if model in ("clinical", "combined") and scaler is not None:
        parts.append(scaler.transform(clinical))
    if model in ("image", "combined"):
        parts.append(reducer.transform(image))
    return np.hstack(parts) if parts else np.zeros((len(image), 0))


def _cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, penalizer: np.ndarray | float) -> np.ndarray | None:
    """Cox coefficients (ridge ``penalizer``, scalar or per column); None when lifelines cannot fit."""
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    if x.shape[1] == 0 or event.sum() == 0:
        return None
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])]).assign(time=time, event=event)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = CoxPHFitter(penalizer=penalizer, l1_ratio=0.0)
            model.fit(frame, duration_col="time", event_col="event")
    except (ConvergenceError, np.linalg.LinAlgError, ValueError):
        return None
    return model.params_.to_numpy()


def _concordance(time: np.ndarray, risk: np.ndarray, event: np.ndarray) -> float | None:
    from lifelines.utils import concordance_index

    try:
        return float(concordance_index(time, -risk, event))
    except ZeroDivisionError:
        return None


def _penalties(model: str, n_clinical: int, n_image: int, image_penalty: float, clinical_penalty: float) -> np.ndarray:
    clinical = [clinical_penalty] * (n_clinical if model in ("clinical", "combined") else 0)
    image = [image_penalty] * (n_image if model in ("image", "combined") else 0)
    return np.asarray(clinical + image, dtype=float)


def _fit_transforms(
    clinical: np.ndarray, image: np.ndarray, settings: MultimodalSettings
) -> tuple[Standardiser | None, ImageReducer]:
    """The standardiser of the clinical covariates (None without any) and the PCA of the embeddings, fitted on
    these rows alone."""
    scaler = Standardiser.fit(clinical) if clinical.shape[1] else None
    return scaler, ImageReducer.fit(image, settings.n_components)


def _fit_model(
    model: str,
    scaler: Standardiser | None,
    reducer: ImageReducer,
    clinical: np.ndarray,
    image: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    penalty: float,
    clinical_penalty: float,
) -> np.ndarray | None:
    """One model's Cox coefficients on these rows with the given transforms and image penalty (None: no fit)."""
    n_clinical = clinical.shape[1] if scaler else 0
    weights = _penalties(model, n_clinical, len(reducer.components), penalty, clinical_penalty)
    return _cox(_features(model, scaler, reducer, clinical, image), time, event, weights)


def _choose_penalty(
    model: str,
    clinical: np.ndarray,
    image: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    settings: MultimodalSettings,
    clinical_penalty: float,
    seed: Sequence[int],
) -> float:
    """The image penalty with the best mean c-index over inner folds of these (training) rows; each inner fold
    fits its own transforms. Ties go to the larger penalty (the simpler model)."""
    k = max(2, min(settings.inner_folds, int(event.sum())))
    folds = _stratified_folds(event.astype(int), k, np.random.default_rng(list(seed)))
    best, best_score = max(settings.penalizers), -np.inf
    for penalty in sorted(settings.penalizers, reverse=True):
        scores = []
        for fold in range(k):
            train, test = folds != fold, folds == fold
            scaler, reducer = _fit_transforms(clinical[train], image[train], settings)
            beta = _fit_model(
                model, scaler, reducer, clinical[train], image[train], time[train], event[train], penalty,
                clinical_penalty,
            )  # fmt: skip
            if beta is None:
                continue
            c = _concordance(
                time[test], _features(model, scaler, reducer, clinical[test], image[test]) @ beta, event[test]
            )
            if c is not None:
                scores.append(c)
        score = float(np.mean(scores)) if scores else -np.inf
        if score > best_score + 1e-12:
            best, best_score = penalty, score
    return best


def fit_fold(
    clinical: np.ndarray,
    image: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    settings: MultimodalSettings,
    *,
    clinical_penalty: float,
    seed: Sequence[int],
) -> FoldFit:
    """Fit every transform and model of one training fold from its rows alone (clinical covariates, embeddings,
    time, event): the standardiser, the PCA reducer, each model's penalty (inner folds) and coefficients."""
    scaler, reducer = _fit_transforms(clinical, image, settings)
    fit = FoldFit(scaler, reducer)
    for model in MODELS:
        if model == "clinical" and scaler is None:
            fit.coefficients[model] = None
            continue
        penalty = clinical_penalty
        if model != "clinical":
            penalty = _choose_penalty(
                model, clinical, image, time, event, settings, clinical_penalty, [*seed, MODELS.index(model)]
            )
        fit.penalizer[model] = penalty
        fit.coefficients[model] = _fit_model(
            model, scaler, reducer, clinical, image, time, event, penalty, clinical_penalty
        )
    return fit


@dataclass(frozen=True)
class MultimodalData:
    """One endpoint's patients: outcome, clinical covariates and patient embeddings, rows aligned."""

    patients: list[str]
    time: np.ndarray
    event: np.ndarray
    clinical: np.ndarray
    clinical_names: list[str]
    image: np.ndarray


def cross_validated_multimodal(
    data: MultimodalData, settings: MultimodalSettings, *, folds: int, repeats: int, seed: int, clinical_penalty: float
) -> tuple[list[dict[str, Any]], dict[tuple[int, int], FoldFit]]:
    """The three models' c-index rows on the same folds, and every fold's fit by (repeat, fold)."""
    event = data.event.astype(int)
    n, events = len(event), int(event.sum())
    k = min(folds, events)
    fits: dict[tuple[int, int], FoldFit] = {}
    values: dict[str, list[float | None]] = {m: [] for m in MODELS}
    pooled: dict[str, list[float]] = {m: [] for m in MODELS}
    failed = dict.fromkeys(MODELS, 0)
    base = {"n": n, "events": events, "folds": k, "repeats": repeats}
    if k < 2 or repeats < 1:
        note = f"not cross-validated: {events} event(s) for {folds} folds"
        return [base | {"model": m, "note": note} for m in MODELS], fits
    for repeat in range(repeats):
        split = _stratified_folds(event, k, np.random.default_rng([seed, repeat]))
        out_of_fold = {m: np.full(n, np.nan) for m in MODELS}
        for fold in range(k):
            train, test = split != fold, split == fold
            fit = fit_fold(
                data.clinical[train],
                data.image[train],
                data.time[train],
                event[train],
                settings,
                clinical_penalty=clinical_penalty,
                seed=[seed, repeat, fold],
            )
            fits[(repeat, fold)] = fit
            for model in MODELS:
                risk = fit.risk(model, data.clinical[test], data.image[test])
                if risk is None:
                    failed[model] += 1
                    values[model].append(None)
                    continue
                out_of_fold[model][test] = risk
                values[model].append(_concordance(data.time[test], risk, event[test]))
        for model in MODELS:
            scored = np.isfinite(out_of_fold[model])
            if scored.sum() > 1:
                c = _concordance(data.time[scored], out_of_fold[model][scored], event[scored])
                if c is not None:
                    pooled[model].append(c)
    rows = []
    for model in MODELS:
        fold_values = np.array([v for v in values[model] if v is not None])
        row = base | {
            "model": model,
            "valid_folds": len(fold_values),
            "failed_folds": failed[model],
            "c_index": float(fold_values.mean()) if len(fold_values) else np.nan,
            "c_index_lower_95": float(np.percentile(fold_values, 2.5)) if len(fold_values) else np.nan,
            "c_index_upper_95": float(np.percentile(fold_values, 97.5)) if len(fold_values) else np.nan,
            "c_index_pooled": float(np.mean(pooled[model])) if pooled[model] else np.nan,
            "n_components": len(next(iter(fits.values())).reducer.components) if model != "clinical" else 0,
            "penalizer_median": float(np.median([f.penalizer[model] for f in fits.values() if model in f.penalizer]))
            if any(model in f.penalizer for f in fits.values())
            else np.nan,
            "note": "",
        }
        if model != "clinical":
            paired = [
                a - b for a, b in zip(values[model], values["clinical"], strict=True) if a is not None and b is not None
            ]
            if paired:
                row |= {
                    "delta_vs_clinical": float(np.mean(paired)),
                    "delta_lower_95": float(np.percentile(paired, 2.5)),
                    "delta_upper_95": float(np.percentile(paired, 97.5)),
                }
        if model == "clinical" and data.clinical.shape[1] == 0:
            row["note"] = "no clinical covariates: set survival.multimodal.clinical (or clinical: terms)"
        elif failed[model]:
            row["note"] = f"{failed[model]} of {k * repeats} fold fits failed"
        rows.append(row)
    return rows, fits


def _clinical_columns(plan: SurvivalPlan, settings: MultimodalSettings) -> list[str]:
    if settings.clinical is not None:
        return list(settings.clinical)
    return [t.name for t in plan.multivariable if t.source == "clinical"]


def multimodal_data(
    clinical_path: str | Path,
    slide_patients: Mapping[str, str],
    slide_embeddings: str | Path,
    plan: SurvivalPlan,
    settings: MultimodalSettings,
) -> dict[str, MultimodalData]:
    """Per endpoint, the patients with an outcome, every clinical covariate and at least one slide embedding."""
    table = read_clinical_table(clinical_path, sorted(set(slide_patients.values())), layout=plan.layout).table
    table = table.loc[table.index.intersection(pd.Index(sorted(set(slide_patients.values()))), sort=False)]
    terms = [
        parse_term(f"clinical:{c}", where="survival.multimodal.clinical") for c in _clinical_columns(plan, settings)
    ]
    design = build_design(table, SlideFeatures(), terms, plan.settings) if terms else None
    clinical = design.frame if design is not None else pd.DataFrame(index=table.index)
    frame, matrix = formats.read_slide_embeddings(slide_embeddings)
    owners = frame["slide_id"].map(lambda s: slide_patients.get(str(s)))
    valid = ~np.isnan(matrix).any(axis=1) & owners.notna().to_numpy()
    if not valid.any():
        raise InputError("no slide has an embedding and a patient of the sheet", where=str(slide_embeddings))
    by_patient = pd.DataFrame(matrix[valid]).groupby(owners[valid].to_numpy()).mean()
    norms = np.linalg.norm(by_patient.to_numpy(), axis=1, keepdims=True)
    image = pd.DataFrame(by_patient.to_numpy() / np.where(norms > 0, norms, 1), index=by_patient.index)
    out = {}
    for endpoint in plan.endpoints:
        outcome = endpoint_frame(table, endpoint, where=f"clinical table {clinical_path}")
        joined = outcome.join(clinical, how="inner").dropna()
        patients = [p for p in joined.index if p in image.index]
        left = len(outcome) - len(patients)
        if left:
            log.warning(
                "%s: %d patient(s) lack a clinical covariate or a slide embedding and are left out", endpoint.name, left
            )
        joined = joined.loc[patients]
        out[endpoint.name] = MultimodalData(
            patients=[str(p) for p in patients],
            time=joined["time"].to_numpy(float),
            event=joined["event"].to_numpy(float),
            clinical=joined[list(clinical.columns)].to_numpy(float),
            clinical_names=list(clinical.columns),
            image=image.loc[patients].to_numpy(float),
        )
    return out


def run_multimodal(
    clinical_path: str | Path,
    slide_patients: Mapping[str, str],
    slide_embeddings: str | Path,
    plan: SurvivalPlan,
    settings: MultimodalSettings,
) -> pd.DataFrame:
    """The c-index table of every endpoint (columns MULTIMODAL_COLUMNS)."""
    rows = []
    for name, data in multimodal_data(clinical_path, slide_patients, slide_embeddings, plan, settings).items():
        found, _ = cross_validated_multimodal(
            data,
            settings,
            folds=plan.settings.cv_folds,
            repeats=plan.settings.cv_repeats,
            seed=plan.settings.seed,
            clinical_penalty=plan.settings.penalizer,
        )
        described = {
            "clinical": ", ".join(data.clinical_names),
            "image": f"slide embedding, {settings.n_components} principal components",
            "combined": ", ".join([*data.clinical_names, "image components"]),
        }
        rows += [row | {"endpoint": name, "covariates": described[row["model"]]} for row in found]
    return pd.DataFrame(rows, columns=MULTIMODAL_COLUMNS)


def plot_multimodal(table: pd.DataFrame, stem: str | Path, style: Any, *, title: str) -> list[Path]:
    """The c-index of each model with its interval, per endpoint; 0.5 (a random ranking) dotted."""
    from histoclip.plots import class_colours, new_figure, save_figure

    colours = class_colours(list(MODELS))
    endpoints = list(dict.fromkeys(table["endpoint"]))
    figure = new_figure(style)
    with style.context():
        ax = figure.add_subplot()
        width = 0.8 / len(MODELS)
        for e, endpoint in enumerate(endpoints):
            for m, model in enumerate(MODELS):
                rows = table[(table["endpoint"] == endpoint) & (table["model"] == model)]
                if rows.empty or not np.isfinite(rows["c_index"].iloc[0]):
                    continue
                row = rows.iloc[0]
                x = e + (m - (len(MODELS) - 1) / 2) * width
                ax.errorbar(
                    x,
                    row["c_index"],
                    yerr=[[row["c_index"] - row["c_index_lower_95"]], [row["c_index_upper_95"] - row["c_index"]]],
                    fmt="o",
                    color=colours[model],
                    capsize=3,
                    label=model if e == 0 else None,
                )
        ax.axhline(0.5, color="0.6", linestyle=":", linewidth=0.8)
        ax.set_xticks(range(len(endpoints)), endpoints)
        ax.set_ylim(0.3, 1.0)
        ax.set_ylabel("cross-validated c-index (mean, 2.5-97.5 % of folds)")
        ax.set_title(title)
        ax.legend(loc="lower right", frameon=False)
    return save_figure(figure, stem, style, data=table, title=title)
