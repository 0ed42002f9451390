"""Cox proportional-hazards fits: what is dropped and why, the proportional-hazards check, the coefficient table.

**Models**: univariable Cox per term (each on the patients that have it), multivariable Cox with every term
(complete cases), optional elastic-net penalty (lifelines ``penalizer``, ``l1_ratio``; lifelines standardises
the covariates before penalising, and with a penalty the 95 % intervals are those of the penalised fit — not
valid confidence intervals). Proportional hazards are checked per covariate with lifelines'
``proportional_hazard_test`` (scaled Schoenfeld residuals against the rank of time). lifelines is imported
inside the functions, so that the workflow can plan the survival rule without it.

**Models that are not fitted.** A model with fewer events per covariate than ``min_events_per_covariate``
(default 5) is not fitted: with 1 event and 1 covariate lifelines still returns a number (an HR of 0.13 with a
95 % interval of 0 to infinity), and a table or a forest plot would show it like any other. A fit that does not
converge (lifelines warns that Newton–Raphson stopped with a large step, or that the likelihood runs to 0:
complete separation, a coefficient heading to ±infinity) is not reported either. Such a model's rows keep ``n``,
``events``, ``n_covariates`` and ``events_per_covariate``, say ``fitted`` false and why in ``note``, and carry no
estimate. A model lifelines cannot fit at all (a singular information matrix: collinear covariates) is an error
naming it. Fewer events per covariate than ``warn_events_per_covariate`` (default 10) is a warning, in the log and
in the rows' note.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from histoclip.errors import InputError
from histoclip.survival.settings import SurvivalSettings
from histoclip.survival.terms import Design, Term

log = logging.getLogger(__name__)

__all__ = ["COX_COLUMNS", "CoxFit", "cox_table", "fit_cox", "lifelines_fit"]


@dataclass
class CoxFit:
    """A Cox model: fitted (``model``), or not (``model`` None: no covariate left, or ``refused`` says why), and what
    was dropped."""

    name: str
    model: Any
    data: pd.DataFrame
    covariates: list[str]
    dropped: dict[str, str]
    ph_p: dict[str, float]
    #: Said of the whole fit, e.g. that it has few events per covariate (copied into every row's note).
    model_note: str = ""
    #: Why the model was not fitted (too few events per covariate, no convergence); empty when it was.
    refused: str = ""

    @property
    def n(self) -> int:
        return len(self.data)

    @property
    def events(self) -> int:
        return int(self.data["event"].sum())

    @property
    def fitted(self) -> bool:
        return self.model is not None

    @property
    def events_per_covariate(self) -> float:
        return self.events / len(self.covariates) if self.covariates else float("nan")


#: lifelines' ConvergenceWarnings that say the fit did not converge (others, e.g. low variance, are notes).
_NOT_CONVERGED = re.compile(r"Newton-Raphson|suspiciously close", re.IGNORECASE)


def _constant_note(values: pd.Series) -> str:
    unique = values.dropna().unique()
    return f"constant: every patient has {unique[0]:g}" if len(unique) else "no values"


def lifelines_fit(frame: pd.DataFrame, settings: SurvivalSettings) -> tuple[Any, list[warnings.WarningMessage]]:
    """lifelines' Cox fit with the settings' penalty, and the warnings it raised (the caller words them)."""
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
    drop). Constant covariates are dropped with a warning. Not fitted (``refused`` says why, logged as a warning):
    fewer than ``min_events_per_covariate`` events per covariate, or a fit that does not converge. A fit lifelines
    cannot do at all is an InputError naming the model and suggesting a penalizer; lifelines' other warnings are
    logged with the model's name."""
    from lifelines.exceptions import ConvergenceError, ConvergenceWarning

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
    counts = f"n = {len(frame)}, {events} event(s), {len(kept)} covariate(s): {events / len(kept):.1f} per covariate"
    if events < settings.min_events_per_covariate * len(kept):
        refused = (
            f"not fitted: {counts}, fewer than survival.min_events_per_covariate = "
            f"{settings.min_events_per_covariate:g} (its estimates would be noise)"
        )
        log.warning("Cox model %s: %s; use fewer covariates or more patients", name, refused)
        return CoxFit(name, None, frame, kept, dropped, {}, refused=refused)
    model_note = ""
    if events < settings.warn_events_per_covariate * len(kept):
        model_note = (
            f"few events: {counts}, fewer than survival.warn_events_per_covariate = "
            f"{settings.warn_events_per_covariate:g}: estimates are unstable"
        )
        log.warning("Cox model %s: %s; use fewer covariates or a penalizer", name, model_note)
    try:
        model, caught = lifelines_fit(frame, settings)
    except (ConvergenceError, np.linalg.LinAlgError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"the Cox model {name!r} ({', '.join(kept)}; {len(frame)} patients, {events} events) could not be "
            f"fitted: {first}",
            where="survival",
            fix="set survival.penalizer (e.g. 0.1) to shrink the coefficients, or remove collinear or nearly "
            "constant covariates",
        ) from exc
    for warning in caught:
        message = str(warning.message).strip().splitlines()[0]
        if issubclass(warning.category, ConvergenceWarning) and _NOT_CONVERGED.search(message):
            refused = (
                f"not fitted: did not converge ({message.rstrip('. ')}); {counts}; a covariate that separates "
                "events from censored patients has no finite hazard ratio: set survival.penalizer (e.g. 0.1) or "
                "remove the covariate"
            )
            log.warning("Cox model %s: %s", name, refused)
            return CoxFit(name, None, frame, kept, dropped, {}, model_note, refused)
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
    "n_covariates",
    "events_per_covariate",
    "fitted",
    "ph_test_p",
    "lr_test_p",
    "penalizer",
    "note",
]


def cox_table(fit: CoxFit, design: Design, terms: Sequence[Term], *, endpoint: str, analysis: str) -> pd.DataFrame:
    """One row per covariate of ``terms`` (dropped ones, and every one of a model that was not fitted, with NaN
    estimates, ``fitted`` false and the reason in ``note``): the columns of COX_COLUMNS. ``n``, ``events`` and
    ``n_covariates`` are the model's: a univariable row's patients are those with that term, a multivariable
    row's those with every term."""
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
                "n_covariates": len(fit.covariates),
                "events_per_covariate": fit.events_per_covariate,
                "fitted": fit.fitted and covariate in fit.covariates,
                "lr_test_p": lr_p,
                "penalizer": fit.model.penalizer if fit.model is not None else float("nan"),
                "note": "; ".join(filter(None, [fit.dropped.get(covariate, ""), fit.refused, fit.model_note])),
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
