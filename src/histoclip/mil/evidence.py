"""Attention evidence: where a MIL model looked on a slide, and the tiles it weighed most.

In the style of the zero-shot evidence (:mod:`histoclip.zeroshot.evidence`, whose tile grid, overlay and tile
reader this reuses): the slide's QC thumbnail with the attention heatmap laid over it and the top-N tiles,
numbered on the heatmap, read from the slide itself. The heatmap shows each tile's attention as its percentile
within the slide (as CLAM draws it): raw attention weights sum to 1 and differ by orders of magnitude between a
slide of 100 tiles and one of 10,000, percentiles compare. Only a bounded number of slides get a figure
(:func:`evidence_slides`): the figures are for looking, and a cohort of 10,000 slides needs a handful of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from PIL import Image

from histoclip import formats
from histoclip.plots import FigureStyle, new_figure, save_figure
from histoclip.tiling import slide as wsi
from histoclip.zeroshot.evidence import (
    CMAP,
    TileLayout,
    bare,
    heatmap_overlay,
    heatmap_panel,
    read_tiles,
    score_grid,
    top_tiles,
)

__all__ = ["attention_percentiles", "evidence_slides", "slide_attention_figure"]


def evidence_slides(calls: pd.DataFrame, classes: Sequence[str], n: int) -> list[str]:
    """Up to ``n`` slides worth a figure, in turn: per class (in ``classes`` order) its most confident correct
    call, then the most confident wrong calls, then the next most confident correct ones. Unlabelled called
    slides (a deployed model) count as correct by their call."""
    called = calls[calls["call"] != ""].copy()
    if called.empty or n <= 0:
        return []
    label = called["label"] if "label" in called.columns else called["call"]
    label = label.where(label.isin(classes), called["call"])
    called["p_call"] = [
        row[formats.probability_column(c)] for c, (_, row) in zip(called["call"], called.iterrows(), strict=True)
    ]
    right = called[called["call"] == label].sort_values(["p_call", "slide_id"], ascending=[False, True])
    wrong = called[called["call"] != label].sort_values(["p_call", "slide_id"], ascending=[False, True])
    queues = [right[label[right.index] == c]["slide_id"].tolist() for c in classes]
    chosen: list[str] = []
    for queue in queues:  # the best correct call of each class first
        if queue and len(chosen) < n:
            chosen.append(queue.pop(0))
    chosen += wrong["slide_id"].tolist()[: max(0, n - len(chosen))]
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


def attention_percentiles(attention: np.ndarray) -> np.ndarray:
    """Each tile's attention as its percentile within the slide (0 lowest … 1 highest; ties share a rank)."""
    attention = np.asarray(attention, dtype=np.float64)
    if attention.size <= 1:
        return np.ones_like(attention)
    order = np.argsort(attention, kind="stable")
    ranks = np.empty(attention.size)
    ranks[order] = np.arange(attention.size)
    # ties: the mean rank of their group
    _, inverse, counts = np.unique(attention, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, ranks)
    return (sums / counts)[inverse] / (attention.size - 1)


def _thumbnail(path: str | os.PathLike[str], max_px: int) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((max_px,) * 2, Image.Resampling.BOX)
        return np.asarray(image)


def _title(slide_id: str, call: Mapping[str, Any], model: str) -> str:
    parts = [slide_id, f"{model} call: {call.get('call') or '-'}"]
    p = call.get(formats.probability_column(str(call.get("call", ""))))
    if p is not None and p == p:
        parts[-1] += f" (p = {float(p):.2f})"
    if call.get("label"):
        parts.append(f"label: {call['label']}")
    if call.get("fold") not in (None, ""):
        parts.append(f"fold {call['fold']}")
    return "  |  ".join(parts)


def slide_attention_figure(
    slide_path: str | os.PathLike[str],
    tiles_path: str | os.PathLike[str],
    attention_path: str | os.PathLike[str],
    thumbnail_path: str | os.PathLike[str],
    out_stem: str | os.PathLike[str],
    *,
    call: Mapping[str, Any],
    model: str,
    top_n: int,
    style: FigureStyle,
) -> pd.DataFrame:
    """Draw one slide's attention figure (``{out_stem}.{formats}``) and its source data (``{out_stem}.tsv``: the
    tiles shown, with rank, corner, attention and percentile). Returns that table."""
    x, y, attention, _ = formats.read_attention(attention_path)
    meta = formats.read_tile_metadata(tiles_path)
    slide_id = str(meta.get("slide_id", Path(tiles_path).stem))
    layout = TileLayout.from_metadata(meta, str(tiles_path))
    percentile = attention_percentiles(attention)
    n = min(top_n, len(x))
    picks = top_tiles(attention, n)
    data = pd.DataFrame(
        {
            "slide_id": slide_id,
            "rank": np.arange(1, n + 1),
            "x": x[picks].astype(np.int64),
            "y": y[picks].astype(np.int64),
            "attention": attention[picks],
            "attention_percentile": percentile[picks],
        }
    )
    with wsi.open_wsi(slide_path, slide_id) as slide:
        images = read_tiles(slide, layout, x[picks], y[picks])
    heat_in, tile_in = 3.2, 1.1
    thumbnail = _thumbnail(thumbnail_path, round(1.2 * heat_in * style.dpi))
    norm = Normalize(0.0, 1.0)
    grid, extent = score_grid(x, y, percentile, layout)
    overlay = heatmap_overlay(thumbnail, grid, extent, (layout.level0_width, layout.level0_height), norm)
    columns = max(1, min(n, 3))
    rows = max(1, -(-n // columns))
    figure = new_figure(
        style, width_in=heat_in + 0.4 + tile_in * columns, height_in=max(heat_in + 0.9, 1.25 * rows + 0.9)
    )
    with style.context():
        figure.suptitle(_title(slide_id, call, model))
        left, right = figure.subfigures(1, 2, width_ratios=[heat_in + 0.4, tile_in * columns])
        ax = left.subplots()
        heatmap_panel(ax, overlay, layout, x[picks], y[picks], style)
        ax.set_title(f"attention, {len(x)} tiles", fontsize=style.font_size)
        bar = left.colorbar(ScalarMappable(norm, CMAP), ax=ax, location="bottom", shrink=0.8, aspect=30, pad=0.02)
        bar.set_label("attention percentile within the slide", fontsize=style.font_size - 1)
        axes = np.atleast_1d(right.subplots(rows, columns, squeeze=False)).ravel()
        for i, tax in enumerate(axes):
            bare(tax)
            if i >= n:
                tax.set_visible(False)
                continue
            tax.imshow(images[i])
            tax.set_title(f"#{i + 1}  {attention[picks[i]] * len(x):.2f}× mean", fontsize=style.font_size - 1)
            tax.set_xlabel(f"x {int(x[picks[i]])}, y {int(y[picks[i]])}", fontsize=style.font_size - 2)
    save_figure(figure, out_stem, style, data=data, title=f"{slide_id}: {model} attention")
    return data
