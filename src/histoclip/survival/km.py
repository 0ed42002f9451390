"""Kaplan–Meier curves per group as step tables, and the log-rank test across the groups.

Why step tables: the figure, its source data and a reviewer's check all read the same rows (numbers at risk,
events, censored, survival and its interval at every distinct time), and a plot can be redrawn without refitting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from histoclip.survival.cells import natural_key

log = logging.getLogger(__name__)

__all__ = ["KM_COLUMNS", "LOGRANK_COLUMNS", "kaplan_meier"]

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
    levels = list(order) if order is not None else sorted(data["group"].unique(), key=natural_key)
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
