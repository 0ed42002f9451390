"""Cox proportional-hazards fits: what is dropped and why, the proportional-hazards check, the coefficient table.

**Models**: univariable Cox per term (each on the patients that have it), multivariable Cox with every term
(complete cases), optional elastic-net penalty (lifelines ``penalizer``, ``l1_ratio``; lifelines standardises
the covariates before penalising, and with a penalty the 95 % intervals are those of the penalised fit — not
valid confidence intervals). Proportional hazards are checked per covariate with lifelines'
``proportional_hazard_test`` (scaled Schoenfeld residuals against the rank of time). lifelines is imported
inside the functions, so that the workflow can plan the survival rule without it.
"""

from __future__ import annotations

import logging
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
        model, caught = lifelines_fit(frame, settings)
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
