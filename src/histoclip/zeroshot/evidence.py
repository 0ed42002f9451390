"""Evidence for zero-shot calls: where on the slide each class scored, and the tiles that scored highest.

Why: a slide call is the mean of a class's top-K tile scores, so a pathologist who doubts a call wants to see
those tiles. Per slide this module draws, for each class, a heatmap of the tile scores laid over the QC
thumbnail and a row of the top-N tiles read from the slide itself, each numbered on the heatmap so a tile in
the gallery can be found on the slide.

Cheap on purpose: the heatmap needs only the tile-score file and the thumbnail written at tiling; pixels are
read from the slide for the N tiles shown and nothing else (never a whole level). And bounded: a figure for
every slide grows with the cohort (about 1 MB and a second or two each) while nobody looks at 10,000 of them,
so :func:`select_slides` picks the ones worth a look - the most confident calls of each class (what the model
takes each class to be), every misclassified slide and every abstention - up to ``figures.evidence.max_slides``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from PIL import Image

from histoclip import formats
from histoclip.config import SectionSettings, default_config
from histoclip.errors import InputError
from histoclip.plots import FigureStyle, new_figure, save_figure
from histoclip.tiling import slide as wsi

__all__ = [
    "EvidenceOptions",
    "TileLayout",
    "heatmap_overlay",
    "read_tiles",
    "score_grid",
    "select_slides",
    "slide_evidence",
    "top_tiles",
]

#: Colour map of the score heatmaps (perceptually uniform, readable in grey and by colour-blind readers).
CMAP = colormaps["viridis"]

#: Tile-file metadata keys a layout needs; tiling writes them for every slide that has tiles.
_LAYOUT_KEYS = (
    "level0_width",
    "level0_height",
    "tile_level0_px",
    "stride_level0_px",
    "tile_px",
    "read_level",
    "read_tile_px",
)


@dataclass(frozen=True)
class TileLayout:
    """Where a slide's tiles sit on level 0 and how to read one as the model saw it (tile-file metadata)."""

    slide_id: str
    level0_width: int
    level0_height: int
    tile_level0_px: int
    stride_level0_px: int
    tile_px: int
    read_level: int
    read_tile_px: int

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], where: str) -> TileLayout:
        missing = [key for key in _LAYOUT_KEYS if key not in meta]
        if missing:
            raise InputError(
                f"tile file metadata lacks {', '.join(missing)} (status {meta.get('status', '?')!r})",
                where=where,
                fix="re-run tiling with this version of histoclip (snakemake --forcerun <this tile file>)",
            )
        return cls(str(meta.get("slide_id", "")), *(int(meta[key]) for key in _LAYOUT_KEYS))

    @classmethod
    def from_tile_file(cls, path: str | os.PathLike[str]) -> TileLayout:
        """Read the layout from a tile file's footer only (no rows)."""
        return cls.from_metadata(formats.read_tile_metadata(path), str(path))


@dataclass(frozen=True)
class EvidenceOptions(SectionSettings, section="figures.evidence"):
    """Config ``figures.evidence``: tiles per class in the gallery, whether background classes get a panel, and
    which slides get a figure (``confident_per_class``, ``max_slides``: :func:`select_slides`)."""

    top_n: int
    include_background: bool
    confident_per_class: int
    max_slides: int | None


#: Why a slide's evidence is drawn (column ``reason`` of the evidence index), in the order they fill
#: ``max_slides``: what the model takes each class to be first (a few slides), then its errors, then its doubts.
#: ``slide`` = every slide (``max_slides: null``) that is none of the others.
REASONS = ("confident", "misclassified", "abstained", "slide")

#: Columns of the evidence index (``evidence.tsv``).
INDEX_COLUMNS = ["slide_id", "reason", "call", "label", "margin", "drawn", "figure", "source_data"]


def select_slides(calls: pd.DataFrame, options: EvidenceOptions) -> pd.DataFrame:
    """The slides whose evidence is worth drawing, and why (one row each, in drawing priority).

    ``calls`` is a calls table (:func:`histoclip.formats.read_calls`). Candidates, among the slides with tiles:
    the ``confident_per_class`` calls of each class with the largest margin (never a misclassified one), every
    misclassified slide (a label, a call, and they differ; most confidently wrong first) and every abstention
    (closest call first). The first ``max_slides`` candidates in that order are ``drawn``; the rest stay in the
    table with ``drawn`` false, so the index still names every error and abstention. ``max_slides`` null draws
    every slide with tiles (reason ``slide`` for the ones that are none of the above). Ties go to sheet order.
    """
    frame = calls.reset_index(drop=True)
    margin = pd.to_numeric(frame["margin"], errors="coerce")
    label = frame["label"].fillna("").astype(str) if "label" in frame else pd.Series("", index=frame.index)
    call = frame["call"].fillna("").astype(str)
    abstain = frame["abstain"].astype(str).str.lower().isin(["true", "1"])
    has_tiles = (pd.to_numeric(frame.get("n_tiles", 1), errors="coerce").fillna(0) > 0) & margin.notna()
    wrong = has_tiles & (label != "") & (call != "") & (call != label)
    picked: list[tuple[int, str]] = []
    # most confident per class, the classes interleaved by rank, so a small cap still shows every class
    ranked = [
        frame.index[has_tiles & ~wrong & (call == cls)][
            np.argsort(-margin[has_tiles & ~wrong & (call == cls)].to_numpy(), kind="stable")
        ][: options.confident_per_class]
        for cls in formats.called_classes(frame)
    ]
    for rank in range(options.confident_per_class):
        picked += [(int(rows[rank]), "confident") for rows in ranked if rank < len(rows)]
    order = frame.index[wrong][np.argsort(-margin[wrong].to_numpy(), kind="stable")]
    picked += [(int(i), "misclassified") for i in order]
    doubtful = has_tiles & abstain & ~wrong
    order = frame.index[doubtful][np.argsort(margin[doubtful].to_numpy(), kind="stable")]
    picked += [(int(i), "abstained") for i in order]
    if options.max_slides is None:
        seen = {i for i, _ in picked}
        picked += [(int(i), "slide") for i in frame.index[has_tiles] if int(i) not in seen]
    limit = len(picked) if options.max_slides is None else options.max_slides
    rows = [i for i, _ in picked]
    return pd.DataFrame(
        {
            "slide_id": frame.loc[rows, "slide_id"].astype(str).to_list(),
            "reason": [reason for _, reason in picked],
            "call": call[rows].to_list(),
            "label": label[rows].to_list(),
            "margin": margin[rows].to_list(),
            "drawn": [n < limit for n in range(len(picked))],
        }
    )


def score_grid(
    x: np.ndarray, y: np.ndarray, scores: np.ndarray, layout: TileLayout
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Tile scores as an image on the tile grid, and its extent in level-0 pixels for ``imshow``.

    ``grid[row, col]`` is the score of the tile whose top-left corner is at (col, row) × stride; cells with
    no tile are NaN (drawn transparent). With overlapping tiles a cell is one stride wide and centred on its
    tile's centre, so every cell is drawn where its tile is. The extent is (left, right, bottom, top), the
    order ``imshow(extent=...)`` takes for an image whose first row is at the top.
    """
    stride = layout.stride_level0_px
    cols = max(1, math.ceil(layout.level0_width / stride))
    rows = max(1, math.ceil(layout.level0_height / stride))
    col = np.rint(np.asarray(x, dtype=np.float64) / stride).astype(np.int64)
    row = np.rint(np.asarray(y, dtype=np.float64) / stride).astype(np.int64)
    off_grid = (np.abs(col * stride - np.asarray(x)) > 1) | (np.abs(row * stride - np.asarray(y)) > 1)
    outside = (col < 0) | (row < 0) | (col >= cols) | (row >= rows)
    if off_grid.any() or outside.any():
        bad = int(np.flatnonzero(off_grid | outside)[0])
        raise InputError(
            f"tile at x={int(x[bad])}, y={int(y[bad])} is not on the slide's tile grid (stride "
            f"{stride} level-0 px, slide {layout.level0_width} x {layout.level0_height})",
            where=f"slide {layout.slide_id!r}",
            fix="the tile-score file and the tile file come from different tilings: re-run zeroshot after tiling",
        )
    grid = np.full((rows, cols), np.nan, dtype=np.float32)
    grid[row, col] = scores
    offset = (layout.tile_level0_px - stride) / 2
    extent = (offset, cols * stride + offset, rows * stride + offset, offset)
    return grid, extent


def heatmap_overlay(
    thumbnail: np.ndarray,
    grid: np.ndarray,
    extent: tuple[float, float, float, float],
    level0_size: tuple[int, int],
    norm: Normalize,
    alpha: float = 0.75,
) -> np.ndarray:
    """The thumbnail (RGB, covering all of level 0) with the score grid blended on it in the heatmap colours.

    One image instead of two stacked ones with transparency: half the pixels in every PDF, and no
    resampling seams between the layers. A thumbnail pixel takes the cell its centre falls in (cells from
    :func:`score_grid`'s extent); pixels off every tile keep the slide's own colour.
    """
    height, width = thumbnail.shape[:2]
    left, right, bottom, top = extent
    cell_w = (right - left) / grid.shape[1]
    cell_h = (bottom - top) / grid.shape[0]
    x0 = (np.arange(width) + 0.5) * level0_size[0] / width
    y0 = (np.arange(height) + 0.5) * level0_size[1] / height
    col = np.floor((x0 - left) / cell_w).astype(np.int64)
    row = np.floor((y0 - top) / cell_h).astype(np.int64)
    col_ok = (col >= 0) & (col < grid.shape[1])
    row_ok = (row >= 0) & (row < grid.shape[0])
    values = np.full((height, width), np.nan, dtype=np.float32)
    values[np.ix_(row_ok, col_ok)] = grid[np.ix_(row[row_ok], col[col_ok])]
    covered = np.isfinite(values)
    colours = CMAP(norm(np.where(covered, values, 0.0)))[..., :3] * 255.0
    out = thumbnail[..., :3].astype(np.float32)
    out[covered] = (1 - alpha) * out[covered] + alpha * colours[covered]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def top_tiles(scores: np.ndarray, n: int) -> np.ndarray:
    """Row indices of the ``n`` highest scores, highest first; equal scores keep file (row-major) order."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(scores.size), -scores))
    return order[: max(0, n)]


def read_tiles(
    slide: wsi.SlideReader, layout: TileLayout, x: Sequence[int] | np.ndarray, y: Sequence[int] | np.ndarray
) -> np.ndarray:
    """The tiles at level-0 corners (x, y) as the embedding step read them, at ``tile_px`` (uint8 [N, t, t, 3]).

    Read at the tile file's read level, cropped to exactly the tile's level-0 extent there (the read size is
    rounded up) and area-resized to ``tile_px``: only these tiles' pixels are decoded.
    """
    downsample = float(slide.level_downsamples[layout.read_level])
    exact = max(1, round(layout.tile_level0_px / downsample))
    out = np.empty((len(x), layout.tile_px, layout.tile_px, 3), dtype=np.uint8)
    for i, (tx, ty) in enumerate(zip(np.asarray(x).tolist(), np.asarray(y).tolist(), strict=True)):
        try:
            rgb = wsi.read_rgb(slide, (int(tx), int(ty)), layout.read_level, (layout.read_tile_px,) * 2)
        except wsi.ReadError as exc:
            raise wsi.undecodable_tile_error(layout.slide_id, tx, ty, layout.read_level, exc) from exc
        out[i] = wsi.resize_rgb(np.ascontiguousarray(rgb[:exact, :exact]), (layout.tile_px, layout.tile_px))
    return out


def bare(ax: Any) -> None:
    """No ticks and no frame: an image panel, not a plot."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _title(slide_id: str, call: Mapping[str, Any] | None) -> str:
    if call is None:
        return slide_id
    parts = [slide_id]
    best = call.get("call") or "abstained"
    p = call.get(f"p_{call.get('best')}")
    parts.append(f"call: {best}" + (f" (p = {float(p):.2f}, margin {float(call['margin']):.2f})" if _ok(p) else ""))
    if _ok(call.get("label")):
        parts.append(f"label: {call['label']}")
    return "  |  ".join(parts)


def _ok(value: Any) -> bool:
    return value is not None and value == value and value != ""  # not None, NaN or empty


def slide_evidence(
    slide_path: str | os.PathLike[str],
    tiles_path: str | os.PathLike[str],
    scores_path: str | os.PathLike[str],
    thumbnail_path: str | os.PathLike[str],
    out_stem: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    call: Mapping[str, Any] | None = None,
    top_k: int | None = None,
    options: EvidenceOptions | None = None,
    style: FigureStyle | None = None,
) -> pd.DataFrame:
    """Draw one slide's evidence figure (``{out_stem}.{formats}``, and ``{out_stem}.report.jpg`` for the HTML
    report) and write its source data (``{out_stem}.tsv``).

    One row per class in ``classes``: the heatmap of that class's tile scores over the QC thumbnail (one
    colour scale for all rows, so classes compare), the top-N tiles numbered on it, and those tiles in a
    row with their scores. ``call`` (a row of calls.tsv) titles the figure; ``top_k`` (top-K pooling) says in
    each row how many tiles made the slide score. The TSV has one row per tile shown in a gallery: class,
    rank, x, y, and every class's score of that tile. Returns that table. ``options`` and ``style`` default to
    the config schema's.
    """
    defaults = default_config()
    options = options or EvidenceOptions.from_config(defaults)
    style = style or FigureStyle.from_config(defaults)
    x, y, scores = formats.read_tile_scores(scores_path)
    unknown = [c for c in classes if c not in scores]
    if unknown:
        raise InputError(
            f"no score_{unknown[0]} column (classes there: {sorted(scores)})",
            where=str(scores_path),
            fix="re-run the zeroshot rule with the prompt set these classes come from",
        )
    tile_meta = formats.read_tile_metadata(tiles_path)
    slide_id = str(tile_meta.get("slide_id", Path(tiles_path).stem))
    columns = ["slide_id", "class", "rank", "x", "y", *[f"score_{c}" for c in scores]]
    if len(x) == 0:
        return _no_tiles_figure(slide_id, tile_meta, columns, out_stem, style)
    layout = TileLayout.from_metadata(tile_meta, str(tiles_path))
    n = min(options.top_n, len(x))
    picks = {c: top_tiles(scores[c], n) for c in classes}
    rows = [
        {"slide_id": slide_id, "class": c, "rank": rank + 1, "x": int(x[i]), "y": int(y[i])}
        | {f"score_{k}": float(v[i]) for k, v in scores.items()}
        for c in classes
        for rank, i in enumerate(picks[c])
    ]
    data = pd.DataFrame(rows, columns=columns)
    shown = np.unique(np.concatenate([picks[c] for c in classes])) if classes else np.zeros(0, np.int64)
    with wsi.open_wsi(slide_path, slide_id) as slide:
        images = dict(zip(shown.tolist(), read_tiles(slide, layout, x[shown], y[shown]), strict=True))
    heat_in, tile_in = 2.6, 1.0
    # No finer than the panel shows: a 1024-px thumbnail per class row would bloat every PDF.
    thumbnail = _read_thumbnail(thumbnail_path, round(1.2 * heat_in * style.dpi))
    norm = _shared_norm([scores[c] for c in classes])

    figure = new_figure(
        style,
        width_in=max(style.width_in, heat_in + 0.6 + tile_in * max(n, 1)),
        height_in=0.45 + 2.4 * max(len(classes), 1),
    )
    with style.context():
        figure.suptitle(_title(slide_id, call))
        subfigures = np.atleast_1d(figure.subfigures(max(len(classes), 1), 1))
        for sub, cls in zip(subfigures, classes, strict=False):
            axes = sub.subplots(1, 1 + n, width_ratios=[heat_in + 0.6] + [tile_in] * n, squeeze=False)[0]
            grid, extent = score_grid(x, y, scores[cls], layout)
            overlay = heatmap_overlay(thumbnail, grid, extent, (layout.level0_width, layout.level0_height), norm)
            heatmap_panel(axes[0], overlay, layout, x[picks[cls]], y[picks[cls]], style)
            pooled = f"slide score = mean of top {min(top_k, len(x))} of {len(x)} tiles" if top_k else f"{len(x)} tiles"
            axes[0].set_title(f"{cls}\n({pooled})", fontsize=style.font_size)
            colorbar = sub.colorbar(
                ScalarMappable(norm, CMAP), ax=axes[0], location="bottom", shrink=0.8, aspect=30, pad=0.02
            )
            colorbar.set_label(f"tile cosine with {cls!r}", fontsize=style.font_size - 1)
            for rank, (tax, i) in enumerate(zip(axes[1:], picks[cls], strict=True)):
                _tile_panel(tax, images[int(i)], rank, scores[cls][i], int(x[i]), int(y[i]), style)
    save_figure(figure, out_stem, style, data=data, title=f"{slide_id}: zero-shot evidence", report_copy=True)
    return data


def _no_tiles_figure(
    slide_id: str,
    tile_meta: Mapping[str, Any],
    columns: list[str],
    out_stem: str | os.PathLike[str],
    style: FigureStyle,
) -> pd.DataFrame:
    """The evidence figure of a slide without tiles: its id and why (the tile file's error), and an empty table."""
    figure = new_figure(style, height_in=1.5)
    with style.context():
        ax = figure.add_subplot()
        ax.set_axis_off()
        reason = tile_meta.get("error") or "the tissue detector found no tiles"
        ax.text(0.5, 0.5, f"{slide_id}: no tiles scored\n{reason}", ha="center", va="center", wrap=True)
    data = pd.DataFrame(columns=columns)
    save_figure(figure, out_stem, style, data=data, title=f"{slide_id}: zero-shot evidence", report_copy=True)
    return data


def heatmap_panel(
    ax: Any, overlay: np.ndarray, layout: TileLayout, x: np.ndarray, y: np.ndarray, style: FigureStyle
) -> None:
    """One class's heatmap over the slide, with its top tiles (level-0 corners ``x``, ``y``) numbered from 1."""
    ax.imshow(overlay, extent=(0, layout.level0_width, layout.level0_height, 0), interpolation="antialiased")
    for rank, (tx, ty) in enumerate(zip(x, y, strict=True)):
        half = layout.tile_level0_px / 2
        ax.text(
            tx + half,
            ty + half,
            str(rank + 1),
            color="white",
            ha="center",
            va="center",
            fontsize=style.font_size - 1,
            fontweight="bold",
        )
    ax.set_xlim(0, layout.level0_width)
    ax.set_ylim(layout.level0_height, 0)
    bare(ax)


def _read_thumbnail(path: str | os.PathLike[str], max_px: int) -> np.ndarray:
    """The QC thumbnail as RGB, shrunk (box filter) to at most ``max_px`` on a side."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((max_px,) * 2, Image.Resampling.BOX)
        return np.asarray(image)


def _shared_norm(class_scores: Sequence[np.ndarray]) -> Normalize:
    """One colour scale over every class's tile scores, so heatmap rows compare (never of zero width)."""
    all_shown = np.concatenate(class_scores)
    vmin, vmax = float(all_shown.min()), float(all_shown.max())
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 1e-3, vmax + 1e-3
    return Normalize(vmin, vmax)


def _tile_panel(ax: Any, image: np.ndarray, rank: int, score: float, x: int, y: int, style: FigureStyle) -> None:
    """One gallery tile: its pixels, its rank and score above, its level-0 corner below."""
    ax.imshow(image)
    bare(ax)
    ax.set_title(f"#{rank + 1}  {score:.3f}", fontsize=style.font_size - 1)
    ax.set_xlabel(f"x {x}, y {y}", fontsize=style.font_size - 2)
