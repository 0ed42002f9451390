"""Kaplan–Meier and forest plots drawn from the survival stage's tables, each returned with its source data.

Why from the tables (km_<grouping>.tsv, cox_*.tsv) and not from the fitted models: a figure can then be re-drawn
in another style without refitting anything, and the TSV beside it holds exactly the numbers that are drawn —
including the numbers at risk printed under a Kaplan–Meier plot, which a reviewer checks first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from histoclip.plots import PALETTE, FigureStyle, new_figure

__all__ = ["at_risk_counts", "forest_figure", "km_figure"]


def at_risk_counts(curve: pd.DataFrame, times: Sequence[float]) -> np.ndarray:
    """Patients still at risk (time ≥ t) at each of ``times``, from one group's Kaplan–Meier step table.

    The table's ``n_at_risk`` at its time t' counts patients with time ≥ t'; no patient leaves between a tick t
    and the next table time t' ≥ t, so the count at t is the count at t' (0 past the last time)."""
    table_times = curve["time"].to_numpy(dtype=float)
    at_risk = curve["n_at_risk"].to_numpy(dtype=float)
    index = np.searchsorted(table_times, np.asarray(times, dtype=float), side="left")
    padded = np.append(at_risk, 0.0)
    return padded[index].astype(int)


def _group_colours(groups: Sequence[str], colours: Mapping[str, str] | None) -> dict[str, str]:
    colours = dict(colours or {})
    spare = iter(c for c in PALETTE if c not in colours.values())
    return {g: colours.get(g) or next(spare, "#777777") for g in groups}


def _p_text(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 0.001 else "< 0.001"


def _message_figure(style: FigureStyle, message: str) -> Figure:
    """A figure that says why there is nothing to draw (a rule must still write its outputs)."""
    with style.context():
        figure = new_figure(style)
        ax = figure.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return figure


def _km_panel(
    ax: Axes,
    subset: pd.DataFrame,
    groups: Sequence[str],
    palette: Mapping[str, str],
    test: pd.DataFrame,
    *,
    endpoint: str,
    title: str,
) -> np.ndarray:
    """One endpoint's curves (steps, 95 % bands, censoring ticks) titled with its log-rank test; returns the x
    ticks inside the plotted range, where the numbers at risk are printed."""
    t_max = float(subset["time"].max()) if len(subset) else 1.0
    for group in groups:
        curve = subset[subset["group"] == group].sort_values("time")
        colour = palette[group]
        n, events = int(curve["n"].iloc[0]), int(curve["events"].iloc[0])
        # Each curve ends at its group's last follow-up time (as lifelines draws it), never extrapolated.
        times = curve["time"].to_numpy(float)
        ax.step(
            times,
            curve["survival"],
            where="post",
            color=colour,
            lw=1.2,
            label=f"{group} (n = {n}, {events} events)",
        )
        lower, upper = curve["ci_lower_95"].to_numpy(float), curve["ci_upper_95"].to_numpy(float)
        ax.fill_between(times, lower, upper, step="post", color=colour, alpha=0.15, lw=0)
        censored = curve[curve["n_censored"] > 0]
        ax.plot(censored["time"], censored["survival"], ls="none", marker="|", ms=5, color=colour, mew=0.9)
    ax.set_xlim(0, t_max * 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("survival probability")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.legend(loc="lower left", frameon=False)
    ticks = [t for t in ax.get_xticks() if 0 <= t <= t_max * 1.02]
    if len(test) and math.isfinite(float(test["p"].iloc[0])):
        row = test.iloc[0]
        result = f"log-rank p = {_p_text(float(row['p']))} (χ² = {float(row['test_statistic']):.2f}, "
        result += f"df = {int(row['df'])})"
    else:
        result = "log-rank test: n/a (one group)"
    grouping = str(subset["grouping"].iloc[0]) if len(subset) else ""
    ax.set_title(f"{title or endpoint.upper()} by {grouping}: {result}" if title or grouping else result)
    return np.asarray(ticks, dtype=float)


def _at_risk_panel(
    risk_ax: Axes,
    subset: pd.DataFrame,
    groups: Sequence[str],
    palette: Mapping[str, str],
    ticks: np.ndarray,
    style: FigureStyle,
    *,
    endpoint: str,
    time_unit: str,
) -> list[dict[str, Any]]:
    """The numbers at risk of every group at every tick, printed in the group's colour under the curves; returns
    them as source-data rows (``kind`` = at_risk)."""
    rows = []
    for row_index, group in enumerate(groups):
        counts = at_risk_counts(subset[subset["group"] == group].sort_values("time"), ticks)
        y = len(groups) - 1 - row_index
        for tick, count in zip(ticks, counts, strict=True):
            risk_ax.text(tick, y, str(count), ha="center", va="center", color=palette[group])
            rows.append({"kind": "at_risk", "endpoint": endpoint, "group": group, "time": tick, "n_at_risk": count})
    risk_ax.set_ylim(-0.6, len(groups) - 0.4)
    risk_ax.set_yticks(range(len(groups)), list(reversed(groups)))
    for label, group in zip(risk_ax.get_yticklabels(), reversed(groups), strict=True):
        label.set_color(palette[group])
    risk_ax.tick_params(axis="y", length=0, pad=3 + 0.7 * style.font_size * len(str(int(subset["n"].max()))))
    risk_ax.tick_params(axis="x", length=0)
    for spine in risk_ax.spines.values():
        spine.set_visible(False)
    risk_ax.set_title("number at risk", loc="left", fontsize=style.font_size - 1)
    risk_ax.set_xlabel(f"time ({time_unit})")
    return rows


def km_figure(
    curves: pd.DataFrame,
    logrank: pd.DataFrame,
    style: FigureStyle,
    *,
    time_unit: str = "months",
    colours: Mapping[str, str] | None = None,
    title: str = "",
) -> tuple[Figure, pd.DataFrame]:
    """Kaplan–Meier curves per group with 95 % bands and censoring ticks, the log-rank result in the title, and
    the numbers at risk at each x tick in a table under the plot; one panel per endpoint.

    Source data: the step tables (``kind`` = curve) plus the printed at-risk numbers (``kind`` = at_risk)."""
    endpoints = list(dict.fromkeys(curves["endpoint"]))
    if not endpoints:
        return _message_figure(style, "No Kaplan–Meier curve: no patient has a group"), curves
    at_risk_rows = []
    with style.context():
        groups_per_endpoint = [list(dict.fromkeys(curves.loc[curves["endpoint"] == e, "group"])) for e in endpoints]
        n_rows = max(len(g) for g in groups_per_endpoint)
        risk_height = 0.16 * n_rows + 0.45
        height = max(style.height_in, len(endpoints) * (2.6 + risk_height))
        figure = new_figure(style, height_in=height)
        ratios = [h for _ in endpoints for h in (2.6, risk_height)]
        grid = figure.add_gridspec(2 * len(endpoints), 1, height_ratios=ratios)
        for index, (endpoint, groups) in enumerate(zip(endpoints, groups_per_endpoint, strict=True)):
            ax = figure.add_subplot(grid[2 * index])
            risk_ax = figure.add_subplot(grid[2 * index + 1], sharex=ax)
            palette = _group_colours(groups, colours)
            subset = curves[curves["endpoint"] == endpoint]
            test = logrank[logrank["endpoint"] == endpoint]
            ticks = _km_panel(ax, subset, groups, palette, test, endpoint=endpoint, title=title)
            at_risk_rows += _at_risk_panel(
                risk_ax, subset, groups, palette, ticks, style, endpoint=endpoint, time_unit=time_unit
            )
            ax.tick_params(axis="x", labelbottom=False)
    data = pd.concat([curves.assign(kind="curve"), pd.DataFrame(at_risk_rows)], ignore_index=True)
    data = data.merge(logrank[["endpoint", "p"]].rename(columns={"p": "logrank_p"}), on="endpoint", how="left")
    return figure, data[["kind", *[c for c in data.columns if c != "kind"]]]


def _forest_panel(
    ax: Axes, rows: pd.DataFrame, covariates: Sequence[str], limits: tuple[float, float], style: FigureStyle
) -> list[dict[str, Any]]:
    """One endpoint's hazard ratios and intervals (clipped to ``limits``), univariable above multivariable on each
    covariate's line, the multivariable estimate printed at the right; returns the plotted rows."""
    low, high = limits
    plotted = []
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    for analysis, offset, marker, face in (
        ("univariable", 0.15, "o", "white"),
        ("multivariable", -0.15, "s", None),
    ):
        part = rows[rows["analysis"] == analysis]
        colour = PALETTE[0] if analysis == "multivariable" else PALETTE[1]
        for _, row in part.iterrows():
            y = len(covariates) - 1 - covariates.index(row["covariate"]) + offset
            hr = float(row["hr"])
            lo, hi = float(row["hr_lower_95"]), float(row["hr_upper_95"])
            ax.plot(
                [np.clip(lo, low, high), np.clip(hi, low, high)],
                [y, y],
                color=colour,
                lw=1.1,
                solid_capstyle="butt",
            )
            ax.plot(
                [np.clip(hr, low, high)],
                [y],
                marker=marker,
                ms=4.5,
                color=colour,
                markerfacecolor=face or colour,
                ls="none",
            )
            plotted.append(
                {
                    "endpoint": row["endpoint"],
                    "analysis": analysis,
                    "covariate": row["covariate"],
                    "reference": row.get("reference", ""),
                    "hr": hr,
                    "hr_lower_95": lo,
                    "hr_upper_95": hi,
                    "p": float(row["p"]),
                    "n": int(row["n"]),
                    "events": int(row["events"]),
                    "y": y,
                }
            )
            if analysis == "multivariable":
                ax.annotate(
                    f"{hr:.2f} ({lo:.2f}–{hi:.2f}), p {_p_text(float(row['p']))}",
                    xy=(1.0, y),
                    xycoords=("axes fraction", "data"),
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=style.font_size - 1.5,
                )
    return plotted


def _hazard_ratio_axis(ax: Axes, limits: tuple[float, float], covariates: Sequence[str]) -> None:
    """A log hazard-ratio axis over ``limits`` with plain-number ticks (denser when the range is narrow), and
    one line per covariate, the first at the top."""
    low, high = limits
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    decades = math.log10(high / low)
    subs = (1.0, 2.0, 5.0) if decades <= 2 else (1.0, 3.0) if decades <= 3.5 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(-0.7, len(covariates) - 0.3)
    ax.set_yticks(range(len(covariates)), list(reversed(covariates)))
    ax.set_xlabel("hazard ratio (95 % CI)")


def forest_figure(
    univariable: pd.DataFrame, multivariable: pd.DataFrame, style: FigureStyle, *, title: str = ""
) -> tuple[Figure, pd.DataFrame]:
    """Hazard ratios with 95 % intervals on a log axis, univariable (open circles) beside multivariable (filled
    squares), one panel per endpoint; the multivariable HR, interval and p printed at the right.

    Source data: the plotted rows (endpoint, analysis, covariate, reference, hr, interval, p, n, events, y)."""
    columns = ["endpoint", "analysis", "covariate", "reference", "hr", "hr_lower_95", "hr_upper_95", "p", "n", "events"]
    tables = [t for t in (univariable, multivariable) if len(t)]
    rows = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    rows = rows[np.isfinite(pd.to_numeric(rows["hr"], errors="coerce"))]
    if rows.empty:
        message = (
            "No Cox model: survival.multivariable and survival.univariable name no term"
            if not tables
            else ("No Cox estimate: every covariate was dropped (see the note column of the Cox tables)")
        )
        return _message_figure(style, message), pd.DataFrame(columns=[*columns, "y"])
    endpoints = list(dict.fromkeys(pd.concat(tables)["endpoint"]))
    covariates = list(dict.fromkeys([*multivariable.get("covariate", []), *univariable.get("covariate", [])]))
    finite = pd.concat([rows["hr_lower_95"], rows["hr_upper_95"]]).astype(float)
    finite = finite[np.isfinite(finite) & (finite > 0)]
    low = max(1e-3, float(finite.min()) / 1.3) if len(finite) else 0.1
    high = min(1e3, float(finite.max()) * 1.3) if len(finite) else 10.0
    low, high = min(low, 0.8), max(high, 1.25)
    plotted = []
    with style.context():
        height = max(style.height_in, 0.32 * len(covariates) + 1.2)
        figure = new_figure(style, height_in=height)
        axes = figure.subplots(1, len(endpoints), sharey=True, squeeze=False)[0]
        for ax, endpoint in zip(axes, endpoints, strict=True):
            plotted += _forest_panel(ax, rows[rows["endpoint"] == endpoint], covariates, (low, high), style)
            _hazard_ratio_axis(ax, (low, high), covariates)
            ax.set_title(endpoint.upper() if not title else f"{title}: {endpoint.upper()}")
        handles = [
            Line2D([], [], marker="o", ls="-", color=PALETTE[1], markerfacecolor="white", label="univariable"),
            Line2D([], [], marker="s", ls="-", color=PALETTE[0], label="multivariable"),
        ]
        figure.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    return figure, pd.DataFrame(plotted, columns=[*columns, "y"])
