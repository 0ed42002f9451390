"""Kaplan–Meier and forest plots drawn from the survival stage's tables, each returned with its source data.

Why from the tables (km_<grouping>.tsv, cox_*.tsv) and not from the fitted models: a figure can then be re-drawn
in another style without refitting anything, and the TSV beside it holds exactly the numbers that are drawn —
including the numbers at risk printed under a Kaplan–Meier plot, which a reviewer checks first.
"""

from __future__ import annotations

import math
import re
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
        p_text = _p_text(float(row["p"]))
        result = f"log-rank p {p_text if p_text.startswith('<') else '= ' + p_text} "
        result += f"(χ² = {float(row['test_statistic']):.2f}, "
        result += f"df = {int(row['df'])})"
    else:
        result = "log-rank test: n/a (one group)"
    grouping = str(subset["grouping"].iloc[0]) if len(subset) else ""
    heading = f"{title or endpoint.upper()} by {grouping}: {result}" if title or grouping else result
    if len(test):  # the patients behind the curves (those with a group and this endpoint's time and event)
        heading += f"\n{_count_text(int(test['n'].iloc[0]), int(test['events'].iloc[0]))}"
    ax.set_title(heading)
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


def _is_fitted(rows: pd.DataFrame) -> pd.Series:
    """Rows with an estimate to draw: fitted (tables without the ``fitted`` column: any finite HR)."""
    finite = pd.Series(np.isfinite(pd.to_numeric(rows["hr"], errors="coerce")), index=rows.index)
    if "fitted" not in rows.columns:
        return finite
    fitted = rows["fitted"].map(lambda v: str(v).strip().lower() in ("true", "1"))
    return fitted & finite


def _count_text(n: int, events: int) -> str:
    return f"n = {n}, {events} event{'s' if events != 1 else ''}"


def _not_fitted_text(row: pd.Series) -> str:
    """Why a row has no estimate, short enough for the plot (the Cox table's note has it in full)."""
    note = str(row.get("note", "") or "")
    counts = _count_text(int(row["n"]), int(row["events"]))
    if note.startswith(("constant", "no values")):  # dropped from its model, fitted or not
        return f"dropped: {note.split(';')[0]} ({counts})"
    if "did not converge" in note:
        return f"not fitted: did not converge ({counts})"
    minimum = re.search(r"min_events_per_covariate = ([0-9.eg+-]+)", note)
    if minimum:
        per = float(row["events_per_covariate"]) if "events_per_covariate" in row else float("nan")
        return f"not fitted: {per:.1f} events per covariate < {minimum.group(1)} ({counts})"
    return f"no estimate: {note.split(';')[0] or 'dropped'} ({counts})"


def _forest_panel(
    ax: Axes, rows: pd.DataFrame, covariates: Sequence[str], limits: tuple[float, float], style: FigureStyle
) -> list[dict[str, Any]]:
    """One endpoint's hazard ratios and intervals (clipped to ``limits``), univariable above multivariable on each
    covariate's line, each estimate printed at the right with its model's n and events; a model that was not
    fitted is not drawn, its line says why. Returns the rows (drawn or not) as source data."""
    low, high = limits
    plotted = []
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    fitted = _is_fitted(rows)
    for analysis, offset, marker, face in (
        ("univariable", 0.17, "o", "white"),
        ("multivariable", -0.17, "s", None),
    ):
        part = rows[rows["analysis"] == analysis]
        colour = PALETTE[0] if analysis == "multivariable" else PALETTE[1]
        for index, row in part.iterrows():
            y = len(covariates) - 1 - covariates.index(row["covariate"]) + offset
            hr = float(row["hr"])
            lo, hi = float(row["hr_lower_95"]), float(row["hr_upper_95"])
            drawn = bool(fitted[index])
            counts = _count_text(int(row["n"]), int(row["events"]))
            if drawn:
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
                ax.annotate(
                    f"{hr:.2f} ({lo:.2f}–{hi:.2f}), p {_p_text(float(row['p']))}; {counts}",
                    xy=(1.0, y),
                    xycoords=("axes fraction", "data"),
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=style.font_size - 1.5,
                    color=colour,
                )
            else:  # where its estimate would be: nothing drawn, and why
                ax.text(
                    0.02,
                    y,
                    f"{analysis} {_not_fitted_text(row)}",
                    transform=ax.get_yaxis_transform(),
                    va="center",
                    fontsize=style.font_size - 1.5,
                    color="#777777",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
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
                    "fitted": drawn,
                    "note": "" if drawn else str(row.get("note", "") or ""),
                    "y": y if drawn else np.nan,
                }
            )
    return plotted


def _panel_title(rows: pd.DataFrame, endpoint: str, title: str) -> str:
    """The endpoint, the multivariable model's n and events (or that it was not fitted), and — when univariable
    models used other patients (each uses those with its own covariate) — theirs."""
    lines = [endpoint.upper() if not title else f"{title}: {endpoint.upper()}"]
    multi = rows[rows["analysis"] == "multivariable"]
    uni = rows[rows["analysis"] == "univariable"]
    if len(multi):
        first = multi.iloc[0]
        counts = _count_text(int(first["n"]), int(first["events"]))
        lines.append(f"multivariable: {counts}" if _is_fitted(multi).any() else f"multivariable not fitted: {counts}")
    if len(uni):
        sizes, events = uni["n"].astype(int), uni["events"].astype(int)
        same = len(multi) and sizes.eq(int(multi["n"].iloc[0])).all()
        if not same:
            n_text = f"{sizes.min()}" if sizes.nunique() == 1 else f"{sizes.min()}–{sizes.max()}"
            e_text = f"{events.min()}" if events.nunique() == 1 else f"{events.min()}–{events.max()}"
            other = " (other patients)" if len(multi) else ""
            lines.append(f"univariable: n = {n_text}, {e_text} events{other}")
    return "\n".join(lines)


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
    squares), one panel per endpoint; every estimate printed at the right with its model's n and events, the
    multivariable model's n and events (and the univariable models' when they used other patients) under the
    panel's title. A model that was not fitted (too few events per covariate, no convergence) is not drawn: its
    line says why.

    Source data: every row (endpoint, analysis, covariate, reference, hr, interval, p, n, events, fitted, note, y;
    y empty where nothing was drawn)."""
    columns = ["endpoint", "analysis", "covariate", "reference", "hr", "hr_lower_95", "hr_upper_95", "p", "n", "events"]
    out_columns = [*columns, "fitted", "note", "y"]
    tables = [t for t in (univariable, multivariable) if len(t)]
    if not tables:
        message = "No Cox model: survival.multivariable and survival.univariable name no term"
        return _message_figure(style, message), pd.DataFrame(columns=out_columns)
    rows = pd.concat(tables, ignore_index=True)
    drawn = rows[_is_fitted(rows)]
    endpoints = list(dict.fromkeys(rows["endpoint"]))
    covariates = list(dict.fromkeys([*multivariable.get("covariate", []), *univariable.get("covariate", [])]))
    finite = pd.concat([drawn["hr_lower_95"], drawn["hr_upper_95"]]).astype(float)
    finite = finite[np.isfinite(finite) & (finite > 0)]
    low = max(1e-3, float(finite.min()) / 1.3) if len(finite) else 0.1
    high = min(1e3, float(finite.max()) * 1.3) if len(finite) else 10.0
    low, high = min(low, 0.8), max(high, 1.25)
    plotted = []
    with style.context():
        height = max(style.height_in, 0.4 * len(covariates) + 1.6)
        figure = new_figure(style, height_in=height)
        axes = figure.subplots(1, len(endpoints), sharey=True, squeeze=False)[0]
        for ax, endpoint in zip(axes, endpoints, strict=True):
            part = rows[rows["endpoint"] == endpoint]
            plotted += _forest_panel(ax, part, covariates, (low, high), style)
            _hazard_ratio_axis(ax, (low, high), covariates)
            ax.set_title(_panel_title(part, endpoint, title), fontsize=style.font_size - 0.5)
        handles = [
            Line2D([], [], marker="o", ls="-", color=PALETTE[1], markerfacecolor="white", label="univariable"),
            Line2D([], [], marker="s", ls="-", color=PALETTE[0], label="multivariable"),
        ]
        figure.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    return figure, pd.DataFrame(plotted, columns=out_columns)
