"""Per-slide attention maps of the aligner, in the style of the zero-shot evidence figures.

The attention weight of each tile (how much it makes the slide vector that is matched to reports) as a
heatmap over the QC thumbnail, the top-N tiles numbered on it and shown in a row with their weights. Drawn for a
bounded number of held-out slides (``report_alignment.attention_slides``): one figure per slide of a cohort is
for the evidence rule; here they illustrate what the learnt pooler looks at.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from histoclip.plots import FigureStyle, new_figure, save_figure
from histoclip.tiling import slide as wsi
from histoclip.zeroshot.evidence import (
    CMAP,
    TileLayout,
    _read_thumbnail,
    _tile_panel,
    heatmap_overlay,
    heatmap_panel,
    read_tiles,
    score_grid,
    top_tiles,
)

__all__ = ["attention_map"]


def attention_map(
    slide_path: str | os.PathLike[str],
    tiles_path: str | os.PathLike[str],
    thumbnail_path: str | os.PathLike[str],
    out_stem: str | os.PathLike[str],
    x: np.ndarray,
    y: np.ndarray,
    attention: np.ndarray,
    *,
    top_n: int,
    style: FigureStyle,
    call: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Draw one slide's attention figure (PNG only, as the evidence figures: one per slide is for looking, not
    print) and write its source data (every tile: x, y, attention, attention × tiles, rank)."""
    layout = TileLayout.from_tile_file(tiles_path)
    slide_id = layout.slide_id
    order = np.argsort(-attention, kind="stable")
    data = pd.DataFrame(
        {
            "slide_id": slide_id,
            "x": np.asarray(x, dtype=np.int64),
            "y": np.asarray(y, dtype=np.int64),
            "attention": attention,
            "relative_attention": attention * len(attention),
            "rank": np.argsort(order) + 1,
        }
    ).sort_values("rank")
    n = min(top_n, len(x))
    picks = top_tiles(attention, n)
    with wsi.open_wsi(slide_path, slide_id) as slide:
        images = read_tiles(slide, layout, x[picks], y[picks])
    heat_in, tile_in = 2.6, 1.0
    thumbnail = _read_thumbnail(thumbnail_path, round(1.2 * heat_in * style.dpi))
    relative = attention * len(attention)  # 1 = the uniform weight of mean pooling, whatever the slide's size
    lo, hi = float(relative.min()), float(relative.max())
    norm = Normalize(lo, hi if hi - lo > 1e-9 else lo + 1e-9)
    figure = new_figure(style, width_in=max(style.width_in, heat_in + 0.6 + tile_in * max(n, 1)), height_in=2.9)
    with style.context():
        title = slide_id
        if call is not None:
            title += f"  |  report-style call: {call.get('call') or 'abstained'}"
            if call.get("label") == call.get("label") and call.get("label"):
                title += f"  |  label: {call['label']}"
        figure.suptitle(title)
        axes = figure.subplots(1, 1 + n, width_ratios=[heat_in + 0.6] + [tile_in] * n, squeeze=False)[0]
        grid, extent = score_grid(x, y, relative, layout)
        overlay = heatmap_overlay(thumbnail, grid, extent, (layout.level0_width, layout.level0_height), norm)
        heatmap_panel(axes[0], overlay, layout, x[picks], y[picks], style)
        axes[0].set_title(f"attention over {len(x)} tiles", fontsize=style.font_size)
        colorbar = figure.colorbar(
            ScalarMappable(norm, CMAP), ax=axes[0], location="bottom", shrink=0.8, aspect=30, pad=0.02
        )
        colorbar.set_label("attention × tiles (1 = uniform)", fontsize=style.font_size - 1)
        for rank, (ax, image, i) in enumerate(zip(axes[1:], images, picks, strict=True)):
            _tile_panel(ax, image, rank, float(relative[i]), int(x[i]), int(y[i]), style)
    save_figure(
        figure, out_stem, replace(style, formats=("png",)), data=data, title=f"{slide_id}: slide–report attention"
    )
    return data
