"""The phenotype gallery: the most central tiles of each phenotype, their pixels, and the gallery figure.

The assignment pass of :mod:`histoclip.cohort.phenotypes` offers every slide's tiles to one
:class:`CentralTiles` per phenotype as the slide streams past (memory: the gallery, never the cohort), and
writes :func:`gallery_table` as ``gallery_tiles.tsv``; the phenotype_gallery rule reads those tiles' pixels from
the slides (:func:`read_gallery_pixels`) and draws them (:func:`gallery_figure`).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip import formats
from histoclip.errors import InputError

__all__ = ["GALLERY_COLUMNS", "CentralTiles", "gallery_figure", "gallery_table", "read_gallery_pixels"]

#: Columns of ``gallery_tiles.tsv``: one row per tile shown, nearest to its centroid first.
GALLERY_COLUMNS = ["phenotype", "rank", "slide_id", "x", "y", "distance"]


@dataclass
class CentralTiles:
    """The ``size`` tiles nearest to one centroid over the cohort, at most ``per_slide`` from one slide."""

    size: int
    per_slide: int
    heap: list[tuple[float, int, str, int, int]] = field(default_factory=list)  # (-distance, order, slide, x, y)
    counter: int = 0

    def offer(self, slide_id: str, x: np.ndarray, y: np.ndarray, distance: np.ndarray) -> None:
        take = np.argsort(distance, kind="stable")[: self.per_slide]
        for i in take:
            item = (-float(distance[i]), -self.counter, slide_id, int(x[i]), int(y[i]))
            self.counter += 1
            if len(self.heap) < self.size:
                heapq.heappush(self.heap, item)
            elif item[0] > self.heap[0][0]:
                heapq.heapreplace(self.heap, item)

    def best(self) -> list[tuple[float, str, int, int]]:
        return sorted((-d, s, x, y) for d, _, s, x, y in self.heap)


def gallery_table(central: Sequence[CentralTiles], phenotypes: Sequence[str]) -> pd.DataFrame:
    """The rows of ``gallery_tiles.tsv``: each phenotype's most central tiles (``central``, one per name in
    ``phenotypes``), ranked nearest first."""
    rows = []
    for p, tiles in enumerate(central):
        for rank, (d, slide_id, tx, ty) in enumerate(tiles.best()):
            rows.append(
                {"phenotype": phenotypes[p], "rank": rank, "slide_id": slide_id, "x": tx, "y": ty, "distance": d}
            )
    return pd.DataFrame(rows, columns=GALLERY_COLUMNS)


def read_gallery_pixels(
    gallery: pd.DataFrame, slide_paths: Mapping[str, str | Path], tile_files: Mapping[str, str | Path]
) -> list[np.ndarray]:
    """RGB pixels (tile_px × tile_px) of every gallery row, read with OpenSlide at the tile file's read level.

    The tile file's metadata says at which pyramid level and size a tile was read (``read_level``,
    ``read_tile_px``) and its size at the target mpp (``tile_px``): the gallery shows exactly what the model saw.
    Each slide is opened once.
    """
    from histoclip.tiling.slide import open_wsi, read_rgb, resize_rgb

    images: list[np.ndarray | None] = [None] * len(gallery)
    for slide_id, group in gallery.groupby("slide_id", sort=False):
        if slide_id not in slide_paths or slide_id not in tile_files:
            raise InputError(
                "is in the phenotype gallery but not in the cohort sheet",
                where=f"slide {slide_id!r}",
                fix="re-run the phenotypes rule after changing the sheet",
            )
        meta = formats.read_tile_metadata(tile_files[slide_id])
        level, read_px, tile_px = int(meta["read_level"]), int(meta["read_tile_px"]), int(meta["tile_px"])
        slide = open_wsi(slide_paths[slide_id], str(slide_id))
        try:
            for index, row in zip(group.index, group.itertuples(), strict=True):
                rgb = read_rgb(slide, (int(row.x), int(row.y)), level, (read_px, read_px))
                images[gallery.index.get_loc(index)] = resize_rgb(rgb, (tile_px, tile_px))
        finally:
            slide.close()
    return [img for img in images if img is not None]


def gallery_figure(gallery: pd.DataFrame, phenotypes: pd.DataFrame, images: Sequence[np.ndarray], style: Any) -> Any:
    """One row per phenotype (its most central tiles, nearest first), labelled with its nearest text class."""
    from histoclip.plots import new_figure

    names = phenotypes["phenotype"].tolist()
    n_cols = max(1, int(gallery.groupby("phenotype").size().max()) if len(gallery) else 1)
    cell_in = min(style.width_in / (n_cols + 1.6), 0.9)
    figure = new_figure(style, width_in=cell_in * (n_cols + 1.6), height_in=max(1.0, cell_in * len(names) + 0.3))
    by_key = {(r.phenotype, r.rank): img for r, img in zip(gallery.itertuples(), images, strict=True)}
    with style.context():
        axes = figure.subplots(len(names), n_cols, squeeze=False, gridspec_kw={"wspace": 0.04, "hspace": 0.08})
        for i, row in enumerate(phenotypes.itertuples()):
            label = row.phenotype.replace("phenotype_", "P")
            if "nearest_class" in phenotypes.columns:
                label = f"{label} {row.nearest_class}\n{row.similarity:.2f} · {row.fraction:.0%}"
            else:
                label = f"{label}\n{row.fraction:.0%}"
            for j in range(n_cols):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                image = by_key.get((row.phenotype, j))
                if image is not None:
                    ax.imshow(image, interpolation="nearest")
                if j == 0:
                    ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=style.font_size - 1)
    return figure
