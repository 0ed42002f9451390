"""The demo's survival truth: times simulated from a known Cox model (Weibull baseline), independent censoring.

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
#: Fraction of patients censored (independent exponential drop-out, one rate calibrated per cohort).
CENSORED_FRACTION = 0.3


def _simulate_survival(rng: np.random.Generator, linear_predictor: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Weibull proportional-hazards event times with independent exponential censoring.

    Censoring times are ``C_i = E_i / rate`` with ``E_i ~ Exp(1)`` i.i.d. and independent of
    everything else; the one scalar ``rate`` is then set so that ``round(CENSORED_FRACTION * n)``
    patients are censored, because with ~30 patients a purely random censored fraction would range
    from 10 % to 55 % between seeds.
    """
    n = linear_predictor.size
    lam = math.log(2) / BASELINE_MEDIAN_MONTHS**WEIBULL_SHAPE
    event_time = (-np.log(rng.random(n)) / (lam * np.exp(linear_predictor))) ** (1 / WEIBULL_SHAPE)
    unit_censor = rng.exponential(1.0, n)
    # Patient i is censored iff rate > unit_censor_i / event_time_i; censor the k smallest ratios.
    ratios = np.sort(unit_censor / event_time)
    k = int(round(CENSORED_FRACTION * n))
    if k <= 0:
        rate = ratios[0] / 2
    elif k >= n:
        rate = ratios[-1] * 2
    else:
        rate = math.sqrt(ratios[k - 1] * ratios[k])
    censor_time = unit_censor / rate
    event = (event_time <= censor_time).astype(np.int64)
    time = np.maximum(np.round(np.minimum(event_time, censor_time), 2), 0.01)
    return time, event, float(rate)


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
    time, event, censor_rate = _simulate_survival(rng, np.asarray(linear_predictor))
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
        "censoring": "independent exponential drop-out, C = Exp(1) / rate, one rate chosen so that "
        "round(censored_fraction * n_patients) patients are censored",
        "censoring_rate_per_month": round(censor_rate, 8),
        "censored_fraction": CENSORED_FRACTION,
        "coefficients": TRUE_COEFFICIENTS,
    }
    return clinical, coefficients, survival
