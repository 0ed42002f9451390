"""Paper figures of the cohort and of the zero-shot calls, each returned with the numbers it shows.

Why here and not in the stage modules: these figures read only the stage outputs (the cohort QC table,
calls.tsv), so they can be re-drawn with another style without recomputing anything, and every function
returns its source data so that the TSV beside a figure is exactly what was plotted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from histoclip.formats import called_classes, probability_column
from histoclip.plots import FigureStyle, class_colours, new_figure
from histoclip.zeroshot.evaluation import binary_auc, evaluated_slides

__all__ = ["cohort_qc_figure", "roc_points", "zeroshot_confusion_figure", "zeroshot_roc_figure"]


def cohort_qc_figure(cohort: pd.DataFrame, style: FigureStyle) -> tuple[Figure, pd.DataFrame]:
    """Tiles per slide (sorted, failed slides marked), tissue area per slide, and mpp source counts.

    A reviewer's first question about a cohort is whether every slide was read at the right scale and gave
    tiles; this shows the outliers (few tiles, a failed read, an mpp that came from a fallback) at a glance.
    """
    table = cohort.copy()
    table["n_tiles"] = pd.to_numeric(table["n_tiles"], errors="coerce").fillna(0).astype(int)
    table["tissue_area_mm2"] = pd.to_numeric(table["tissue_area_mm2"], errors="coerce")
    table = table.sort_values(["n_tiles", "slide_id"], ascending=[False, True]).reset_index(drop=True)
    ok = table["status"].astype(str) == "ok"
    with style.context():
        figure = new_figure(style, height_in=style.height_in)
        grid = figure.add_gridspec(2, 2, width_ratios=(2.2, 1))
        tiles_ax = figure.add_subplot(grid[:, 0])
        area_ax = figure.add_subplot(grid[0, 1])
        source_ax = figure.add_subplot(grid[1, 1])
        positions = np.arange(len(table))
        colours = np.where(ok, "#0072B2", "#D55E00")
        tiles_ax.bar(positions, table["n_tiles"], color=colours, width=0.85)
        tiles_ax.set_xlabel(f"slides, sorted ({int(ok.sum())} ok, {int((~ok).sum())} failed)")
        tiles_ax.set_ylabel("tiles")
        tiles_ax.set_xticks([])
        tiles_ax.set_title("Tiles per slide")
        area = table.loc[ok, "tissue_area_mm2"].dropna()
        area_ax.hist(area, bins=min(20, max(5, len(area) // 2)), color="#009E73")
        area_ax.set_xlabel("tissue area (mm²)")
        area_ax.set_ylabel("slides")
        source = table["mpp_source"].fillna("").astype(str)
        # a failed slide keeps the source its metadata gave (histoclip.tiling.grid.slide_facts); only a slide that
        # failed before its mpp could be resolved has none, and says so rather than "unknown"
        source = source.mask((source == "") & ~ok, "none (failed first)").replace("", "unknown")
        table = table.assign(mpp_source=source)  # the source data says what the bars count
        counts = source.value_counts()
        source_ax.barh(counts.index, counts.to_numpy(), color="#CC79A7")
        source_ax.set_xlabel("slides")
        source_ax.set_title("mpp taken from", fontsize=style.font_size)
    columns = ["slide_id", "patient_id", "status", "n_tiles", "tissue_area_mm2", "level0_mpp", "mpp_source"]
    return figure, table[[c for c in columns if c in table.columns]]


def _evaluated(calls: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    if "label" not in calls.columns:
        raise ValueError("calls.tsv has no label column: the cohort sheet has no labels to draw this figure from")
    subset = evaluated_slides(calls, classes)
    if subset.empty:
        raise ValueError("no labelled, non-training slides with tiles: nothing to evaluate")
    return subset


def zeroshot_confusion_figure(calls: pd.DataFrame, style: FigureStyle, title: str = "") -> tuple[Figure, pd.DataFrame]:
    """Confusion matrix of zero-shot calls on the evaluated slides (labelled, not in the training split), with
    an 'abstained' column so that abstentions are visible instead of silently dropped."""
    classes = called_classes(calls)
    subset = _evaluated(calls, classes)
    predicted = subset["call"].fillna("").astype(str).replace("", "abstained")
    columns = [*classes, "abstained"] if (predicted == "abstained").any() else list(classes)
    matrix = pd.crosstab(subset["label"], predicted).reindex(index=classes, columns=columns, fill_value=0)
    with style.context():
        size = min(style.width_in, style.height_in)
        figure = new_figure(style, width_in=size * len(columns) / len(classes), height_in=size)
        ax = figure.add_subplot(1, 1, 1)
        values = matrix.to_numpy()
        ax.imshow(values, cmap="Blues", vmin=0, vmax=max(1, values.max()))
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > values.max() / 2 else "black")
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("zero-shot call")
        ax.set_ylabel("true label")
        ax.set_title(title or f"Zero-shot calls ({len(subset)} held-out slides)")
    data = matrix.reset_index().rename(columns={"label": "true_label"})
    return figure, data


def roc_points(labels: Sequence[str], probabilities: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One-vs-rest ROC points per class (class, threshold, fpr, tpr) and each class's AUC (column ``auc``).

    Thresholds are the distinct probabilities, highest first, starting at +inf (no slide called positive)."""
    labels = np.asarray(labels)
    frames = []
    for index, cls in enumerate(classes):
        positive = labels == cls
        if positive.all() or not positive.any():
            continue
        score = probabilities[:, index]
        thresholds = np.concatenate([[np.inf], np.unique(score)[::-1]])
        tpr = np.array([(score[positive] >= t).mean() for t in thresholds])
        fpr = np.array([(score[~positive] >= t).mean() for t in thresholds])
        frames.append(
            pd.DataFrame(
                {
                    "class": cls,
                    "threshold": thresholds,
                    "fpr": fpr,
                    "tpr": tpr,
                    "auc": binary_auc(positive, score),
                }
            )
        )
    if not frames:
        raise ValueError("every evaluated slide has the same label: a ROC curve needs positives and negatives")
    return pd.concat(frames, ignore_index=True)


def zeroshot_roc_figure(calls: pd.DataFrame, style: FigureStyle, title: str = "") -> tuple[Figure, pd.DataFrame]:
    """One-vs-rest ROC curve per called class from the slide probabilities (abstained slides included: the
    probabilities exist even where the call is withheld); with two classes, the one curve of the second."""
    classes = called_classes(calls)
    subset = _evaluated(calls, classes)
    probabilities = subset[[probability_column(c) for c in classes]].to_numpy(dtype=np.float64)
    points = roc_points(subset["label"].tolist(), probabilities, classes)
    if len(classes) == 2:  # the two one-vs-rest curves are mirror images: show the second class's, as sklearn
        points = points[points["class"] == classes[1]].reset_index(drop=True)
    colours = class_colours(classes)
    with style.context():
        size = min(style.width_in, style.height_in)
        figure = new_figure(style, width_in=size, height_in=size)
        ax = figure.add_subplot(1, 1, 1)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for cls, group in points.groupby("class", sort=False):
            ax.step(
                group["fpr"],
                group["tpr"],
                where="post",
                color=colours[cls],
                label=f"{cls} (AUC {group['auc'].iloc[0]:.2f})",
            )
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right")
        ax.set_title(title or f"Zero-shot ROC ({len(subset)} held-out slides)")
    return figure, points
