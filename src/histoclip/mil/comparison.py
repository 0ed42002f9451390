"""One figure a cohort paper prints: zero-shot vs few-shot (k = 1, 2, 4, …) vs MIL, on the same held-out slides.

The held-out slides are the ones the zero-shot evaluation and few-shot score
(:func:`histoclip.zeroshot.evaluation.evaluated_slides`: labelled with a called class, with tiles, outside the
train split). Zero-shot and MIL are scored on exactly those slides (MIL's out-of-fold calls: each slide called by
the fold model that never saw its patient); few-shot's per-draw results were scored on them by rule fewshot (its
``n_test`` is checked against theirs).

Intervals: zero-shot and MIL carry the percentile bootstrap 95 % interval over slides of the evaluation code;
few-shot the 2.5–97.5th percentile of its draws (which shots were drawn moves few-shot more than which slides
are tested; the per-draw table has no predictions to bootstrap). The ``interval`` column names which.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip import formats
from histoclip.errors import InputError
from histoclip.zeroshot.evaluation import evaluate, evaluated_slides
from histoclip.zeroshot.fewshot import quiet_evaluation

__all__ = ["COMPARISON_COLUMNS", "compare_methods", "plot_comparison"]

log = logging.getLogger(__name__)

COMPARISON_COLUMNS = ["method", "k", "name", "balanced_accuracy", "lower_95", "upper_95", "n_slides", "interval"]
MIL_NAMES = {"abmil": "ABMIL (gated attention)", "mean": "MIL mean-pool (linear)"}


def _scored(
    frame: pd.DataFrame,
    labels: list[str],
    answers: list[str],
    probs: np.ndarray | None,
    classes: list[str],
    n_bootstrap: int,
    seed: int,
) -> tuple[float, float, float]:
    with quiet_evaluation():
        result = evaluate(labels, answers, probs, classes, n_bootstrap=n_bootstrap, seed=seed)
    ci = result["ci"]["balanced_accuracy"]
    return result["balanced_accuracy"], ci["low"], ci["high"]


def compare_methods(
    zeroshot_calls: pd.DataFrame,
    fewshot: pd.DataFrame | None,
    mil_calls: Mapping[str, pd.DataFrame],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    where: str = "mil comparison",
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Rows of COMPARISON_COLUMNS (zero-shot, few-shot per method and k, each MIL model) and facts for the log
    (the held-out slides, the classes, chance)."""
    classes = formats.called_classes(zeroshot_calls)
    held = evaluated_slides(zeroshot_calls, classes)
    for name, calls in mil_calls.items():
        mil_classes = formats.called_classes(calls)
        if sorted(mil_classes) != sorted(classes):
            raise InputError(
                f"the MIL task's classes {mil_classes} are not the prompt set's called classes {classes}",
                where=f"{where} ({name})",
                fix="compare a MIL task whose classes are the prompt set's (mil.tasks.<task>.classes)",
            )
    called = set(held["slide_id"])
    for calls in mil_calls.values():
        called &= set(calls.loc[calls["call"] != "", "slide_id"])
    if len(called) < len(held):
        log.warning("%d held-out slide(s) have no MIL call and are left out of the comparison", len(held) - len(called))
        held = held[held["slide_id"].isin(called)]
    if held.empty:
        raise InputError("no held-out slide has both a zero-shot and a MIL call", where=where)
    labels = held["label"].tolist()
    rows: list[dict[str, Any]] = []
    probs = held[[formats.probability_column(c) for c in classes]].to_numpy()
    value, low, high = _scored(held, labels, held["best"].tolist(), probs, classes, n_bootstrap, seed)
    rows.append(
        {
            "method": "zeroshot",
            "k": 0,
            "name": "zero-shot",
            "balanced_accuracy": value,
            "lower_95": low,
            "upper_95": high,
            "n_slides": len(held),
            "interval": "bootstrap over slides",
        }
    )
    if fewshot is not None and len(fewshot):
        n_test = set(fewshot["n_test"].astype(int))
        if n_test != {len(held)}:
            log.warning("few-shot was scored on %s held-out slides, zero-shot and MIL on %d", sorted(n_test), len(held))
        for (method, k), group in fewshot.groupby(["method", "k"], sort=True):
            values = group["balanced_accuracy"].astype(float).to_numpy()
            low, high = np.percentile(values, [2.5, 97.5])
            rows.append(
                {
                    "method": f"fewshot_{method}",
                    "k": int(k),
                    "name": f"few-shot {method}, k = {int(k)}",
                    "balanced_accuracy": float(np.median(values)),
                    "lower_95": float(low),
                    "upper_95": float(high),
                    "n_slides": int(group["n_test"].iloc[0]),
                    "interval": f"spread over {len(values)} draws",
                }
            )
    for name, calls in mil_calls.items():
        rows_of = calls.set_index("slide_id").loc[held["slide_id"]]
        mil_probs = rows_of[[formats.probability_column(c) for c in classes]].to_numpy()
        value, low, high = _scored(rows_of, labels, rows_of["call"].tolist(), mil_probs, classes, n_bootstrap, seed)
        rows.append(
            {
                "method": f"mil_{name}",
                "k": -1,
                "name": MIL_NAMES.get(name, name),
                "balanced_accuracy": value,
                "lower_95": low,
                "upper_95": high,
                "n_slides": len(held),
                "interval": "bootstrap over slides",
            }
        )
    facts = {"classes": classes, "chance": 1.0 / len(classes), "held_out_slides": held["slide_id"].tolist()}
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS), facts


def plot_comparison(table: pd.DataFrame, stem: str | Path, style: Any, *, chance: float, title: str) -> list[Path]:
    """Balanced accuracy with its interval per method, one row each (zero-shot, few-shot by method and k, MIL),
    chance dotted."""
    from histoclip.plots import class_colours, new_figure, save_figure

    groups = [
        "zeroshot",
        *sorted(m for m in table["method"].unique() if m.startswith("fewshot")),
        *[m for m in table["method"].unique() if m.startswith("mil")],
    ]
    colours = class_colours(groups)
    figure = new_figure(style, height_in=max(style.height_in, 0.8 + 0.28 * len(table)))
    with style.context():
        ax = figure.add_subplot()
        y = np.arange(len(table))[::-1]
        for i, row in enumerate(table.itertuples()):
            colour = colours.get(row.method, "0.3")
            low = row.balanced_accuracy - row.lower_95 if row.lower_95 == row.lower_95 else 0
            high = row.upper_95 - row.balanced_accuracy if row.upper_95 == row.upper_95 else 0
            ax.errorbar(
                row.balanced_accuracy, y[i], xerr=[[max(low, 0)], [max(high, 0)]], fmt="o", color=colour, capsize=3
            )
        ax.axvline(chance, color="0.6", linestyle=":", linewidth=0.8)
        ax.set_yticks(y, [f"{n}  (n = {s})" for n, s in zip(table["name"], table["n_slides"], strict=True)])
        ax.set_xlim(0, 1.02)
        ax.set_xlabel("balanced accuracy, held-out slides (95 % interval; dotted: chance)")
        ax.set_title(title)
    return save_figure(figure, stem, style, data=table, title=title)
