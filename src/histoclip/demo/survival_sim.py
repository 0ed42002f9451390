"""The demo's survival truth: times simulated from a known Cox model (Weibull baseline), censored as a cohort study is.

The coefficients are written beside the cohort (``true_coefficients.tsv``), so the survival stage can be
checked against the model that generated the data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from histoclip.demo.classes import SUBTYPES

#: Log hazard ratios of the simulated Cox model, keyed by the clinical.tsv column they apply to.
TRUE_COEFFICIENTS: dict[str, float] = {
    "subtype_squamous": 1.2,
    "necrosis_fraction": 3.0,
    "age": 0.04,
}
_COEFFICIENT_DESCRIPTIONS = {
    "subtype_squamous": "log hazard ratio of squamous vs adenocarcinoma; subtype_squamous = 1 if subtype is "
    "squamous else 0",
    "necrosis_fraction": "log hazard ratio per unit of necrosis fraction of tissue (0-1; +0.1 -> x exp(0.3)); "
    "patient value = tissue-area-weighted mean over the patient's slides, as measured on the class maps",
    "age": "log hazard ratio per year of age (0.4 per decade); age in years at diagnosis",
}
#: Weibull baseline: shape, and median survival (months) of an adenocarcinoma patient aged 60, no necrosis.
WEIBULL_SHAPE = 1.3
BASELINE_MEDIAN_MONTHS = 48.0
#: Censoring as a cohort study gives it: patients enter over ACCRUAL_MONTHS and are followed until the study
#: closes MIN_FOLLOW_UP_MONTHS after the last one entered (administrative censoring: each patient's potential
#: follow-up is uniform on [MIN_FOLLOW_UP_MONTHS, MIN_FOLLOW_UP_MONTHS + ACCRUAL_MONTHS]), and some are lost to
#: follow-up before that (exponential, LOSS_TO_FOLLOW_UP_PER_YEAR). With the hazards above (median survival
#: 1-4 years, as in lung cancer) this censors about a quarter of the patients; the event rate is what the
#: model gives, not a number fixed in advance.
ACCRUAL_MONTHS = 48.0
MIN_FOLLOW_UP_MONTHS = 24.0
LOSS_TO_FOLLOW_UP_PER_YEAR = 0.05


def _simulate_survival(rng: np.random.Generator, linear_predictor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weibull proportional-hazards event times, censored by the study's close and by loss to follow-up.

    Both censoring times are drawn independently of everything else, so censoring is non-informative, as the
    Cox model assumes.
    """
    n = linear_predictor.size
    lam = math.log(2) / BASELINE_MEDIAN_MONTHS**WEIBULL_SHAPE
    event_time = (-np.log(rng.random(n)) / (lam * np.exp(linear_predictor))) ** (1 / WEIBULL_SHAPE)
    study_close = rng.uniform(MIN_FOLLOW_UP_MONTHS, MIN_FOLLOW_UP_MONTHS + ACCRUAL_MONTHS, n)
    lost = rng.exponential(12.0 / LOSS_TO_FOLLOW_UP_PER_YEAR, n)
    censor_time = np.minimum(study_close, lost)
    event = (event_time <= censor_time).astype(np.int64)
    time = np.maximum(np.round(np.minimum(event_time, censor_time), 2), 0.01)
    return time, event


def clinical_tables(
    rng: np.random.Generator,
    patient_ids: list[str],
    subtype: np.ndarray,
    age: np.ndarray,
    sex: np.ndarray,
    necrosis: np.ndarray,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The clinical table (survival from the known Cox model, on the necrosis actually painted), the table of
    true coefficients, and the survival part of ``cohort.json``.

    ``subtype`` indexes :data:`~histoclip.demo.classes.SUBTYPES`; ``necrosis`` is each patient's necrosis
    fraction of tissue as measured on the class maps.
    """
    squamous = (subtype == SUBTYPES.index("squamous")).astype(np.int64)
    covariates = {"subtype_squamous": squamous, "necrosis_fraction": necrosis, "age": age}
    linear_predictor = sum(TRUE_COEFFICIENTS[k] * np.asarray(v, np.float64) for k, v in covariates.items())
    linear_predictor = linear_predictor - TRUE_COEFFICIENTS["age"] * 60  # baseline: age 60
    time, event = _simulate_survival(rng, np.asarray(linear_predictor))
    clinical = pd.DataFrame(
        {
            "patient_id": patient_ids,
            "time": time,
            "event": event,
            "age": age,
            "sex": sex,
            "subtype": [SUBTYPES[s] for s in subtype],
            "subtype_squamous": squamous,
            "necrosis_fraction": np.round(necrosis, 6),
        }
    )
    coefficients = pd.DataFrame(
        {
            "covariate": list(TRUE_COEFFICIENTS),
            "coefficient": list(TRUE_COEFFICIENTS.values()),
            "description": [_COEFFICIENT_DESCRIPTIONS[k] for k in TRUE_COEFFICIENTS],
        }
    )
    survival = {
        "model": "h(t) = lambda * k * t^(k-1) * exp(sum(coefficient * covariate) - 0.04 * 60)",
        "weibull_shape": WEIBULL_SHAPE,
        "baseline_median_months": BASELINE_MEDIAN_MONTHS,
        "censoring": "administrative (accrual over accrual_months, study closed min_follow_up_months after the "
        "last patient entered: follow-up uniform on [min, min + accrual]) and loss to follow-up (exponential)",
        "accrual_months": ACCRUAL_MONTHS,
        "min_follow_up_months": MIN_FOLLOW_UP_MONTHS,
        "loss_to_follow_up_per_year": LOSS_TO_FOLLOW_UP_PER_YEAR,
        "n_events": int(event.sum()),
        "censored_fraction": round(1 - float(event.mean()), 4),
        "coefficients": TRUE_COEFFICIENTS,
    }
    return clinical, coefficients, survival
