"""Tile files (``results/tiles/{slide}.parquet``), tissue masks (``results/qc/tissue/{slide}.png``) and the cohort
table (``results/qc/cohort.tsv``).

A tile file lists one slide's kept tiles: ``x``, ``y`` (level-0 top-left corners) and ``tissue`` (the tissue
fraction), row-major. Its footer says how the tiles were measured and are to be read (``read_level``,
``read_tile_px``, ``tile_level0_px``, ``tile_px``, mpp, ``status`` …). A slide recorded as failed has no rows and
its cause in the footer; ``reader`` names the slide reader that opened the file (histoclip.tiling.readers).
The cohort table is one row per slide made of those footers (:data:`COHORT_COLUMNS`).

The tissue mask is the boolean mask tiling measured the tile fractions on, covering the whole of level 0 at
``tissue_mask_mpp`` (a 1-bit PNG, a few kB): kept so that later stages (the QuPath export's tissue annotations)
draw the very tissue the tiles were chosen from instead of detecting it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, PngImagePlugin

from histoclip import store
from histoclip.errors import InputError

__all__ = [
    "COHORT_COLUMNS",
    "TILE_SCHEMA",
    "TissueMask",
    "read_cohort_table",
    "read_tile_file",
    "read_tile_metadata",
    "read_tile_table",
    "read_tissue_mask",
    "write_cohort_table",
    "write_tile_file",
    "write_tissue_mask",
]

TILE_SCHEMA = pa.schema([("x", pa.int64()), ("y", pa.int64()), ("tissue", pa.float32())])

#: Columns of results/qc/cohort.tsv, in order.
COHORT_COLUMNS = (
    "slide_id",
    "patient_id",
    "status",
    "error",
    "vendor",
    "reader",
    "level0_width",
    "level0_height",
    "level_count",
    "level0_mpp",
    "mpp_source",
    "target_mpp",
    "read_level",
    "tile_px",
    "tile_level0_px",
    "tissue_area_mm2",
    "n_tiles",
    "warnings",
)


def write_tile_file(
    path: str | Path,
    metadata: dict[str, Any],
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    tissue: np.ndarray | None = None,
) -> None:
    """One slide's tiles (``x``, ``y``, ``tissue``); without them, the empty file of a slide recorded as failed."""
    if x is None or y is None or tissue is None:
        table = TILE_SCHEMA.empty_table()
    else:
        table = pa.Table.from_arrays(
            [pa.array(x, pa.int64()), pa.array(y, pa.int64()), pa.array(tissue, pa.float32())], schema=TILE_SCHEMA
        )
    store.write_table_atomic(path, table, metadata)


def read_tile_metadata(path: str | Path) -> dict[str, Any]:
    """The footer of a tile file: how the slide was tiled (cheap: no rows are read)."""
    return store.read_metadata(path)


def read_tile_file(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(x, y, metadata) of one slide's tile file."""
    meta = store.read_metadata(path)
    table = pq.read_table(path, columns=["x", "y"])
    return table.column("x").to_numpy(), table.column("y").to_numpy(), meta


def read_tile_table(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(x, y, tissue fraction, metadata) of one slide's tile file."""
    meta = store.read_metadata(path)
    table = pq.read_table(path, columns=["x", "y", "tissue"])
    return table.column("x").to_numpy(), table.column("y").to_numpy(), table.column("tissue").to_numpy(), meta


def write_cohort_table(table: pd.DataFrame, path: str | Path) -> None:
    """The cohort table (or one tiling shard's part of it: the parts are concatenated as text)."""
    store.write_text_atomic(path, table.to_csv(sep="\t", index=False, float_format="%.6g"))


def read_cohort_table(path: str | Path) -> pd.DataFrame:
    """The cohort table; ids as text, and a failed slide's empty fields as "" (not NaN)."""
    return pd.read_csv(path, sep="\t", dtype={"slide_id": str, "patient_id": str}, keep_default_na=False)


#: PNG text chunk of a tissue mask: its JSON metadata (slide id, level-0 size, mask mpp, status, provenance).
TISSUE_MASK_KEY = "histoclip.tissue_mask"


@dataclass(frozen=True)
class TissueMask:
    """A slide's tissue mask as tiling measured it: ``mask[row, col]`` covers the whole of level 0
    (``level0_width`` × ``level0_height``), so one mask pixel is ``level0_width / mask.shape[1]`` level-0 pixels
    wide. ``status`` is "error" (and the mask a single empty pixel) for a slide recorded as failed."""

    mask: np.ndarray
    slide_id: str
    level0_width: int
    level0_height: int
    mask_mpp: float
    status: str
    metadata: dict[str, Any]

    @property
    def level0_px_per_mask_px(self) -> tuple[float, float]:
        """(x, y) level-0 pixels per mask pixel."""
        return self.level0_width / self.mask.shape[1], self.level0_height / self.mask.shape[0]


def write_tissue_mask(path: str | Path, mask: np.ndarray | None, metadata: dict[str, Any]) -> None:
    """A slide's tissue mask as a 1-bit PNG, ``metadata`` (``slide_id``, ``level0_width``, ``level0_height``,
    ``tissue_mask_mpp``, ``status`` …) and provenance in a text chunk. ``mask`` None: a slide recorded as failed
    (one empty pixel, so the file exists and says why in its metadata)."""
    pixels = np.zeros((1, 1), bool) if mask is None else np.asarray(mask, bool)
    meta = {
        **metadata,
        "status": metadata.get("status", "ok"),
        store.PROVENANCE_KEY: {"versions": store.package_versions()},
    }
    info = PngImagePlugin.PngInfo()
    info.add_text(TISSUE_MASK_KEY, json.dumps(meta))
    with store.atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info, optimize=True)


def read_tissue_mask(path: str | Path) -> TissueMask:
    """A tissue mask written by :func:`write_tissue_mask`."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get(TISSUE_MASK_KEY)
        if text is None:
            raise InputError(
                f"no {TISSUE_MASK_KEY!r} text chunk: not a tissue mask written by histoclip",
                where=str(path),
                fix="re-run the tiling rule that writes it (delete the file to force it)",
            )
        mask = np.asarray(image.convert("1")).astype(bool)
    meta = json.loads(text)
    return TissueMask(
        mask,
        str(meta.get("slide_id", "")),
        int(meta.get("level0_width", mask.shape[1])),
        int(meta.get("level0_height", mask.shape[0])),
        float(meta.get("tissue_mask_mpp", float("nan"))),
        str(meta["status"]),
        meta,
    )
