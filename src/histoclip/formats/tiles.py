"""Tile files (``results/tiles/{slide}.parquet``) and the cohort table (``results/qc/cohort.tsv``).

A tile file lists one slide's kept tiles: ``x``, ``y`` (level-0 top-left corners) and ``tissue`` (the tissue
fraction), row-major. Its footer says how the tiles were measured and are to be read (``read_level``,
``read_tile_px``, ``tile_level0_px``, ``tile_px``, mpp, ``status`` …). A slide recorded as failed has no rows and
its cause in the footer; ``reader`` names the slide reader that opened the file (histoclip.tiling.readers).
The cohort table is one row per slide made of those footers (:data:`COHORT_COLUMNS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from histoclip import store

__all__ = [
    "COHORT_COLUMNS",
    "TILE_SCHEMA",
    "read_cohort_table",
    "read_tile_file",
    "read_tile_metadata",
    "write_cohort_table",
    "write_tile_file",
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


def write_cohort_table(table: pd.DataFrame, path: str | Path) -> None:
    """The cohort table (or one tiling shard's part of it: the parts are concatenated as text)."""
    store.write_text_atomic(path, table.to_csv(sep="\t", index=False, float_format="%.6g"))


def read_cohort_table(path: str | Path) -> pd.DataFrame:
    """The cohort table; ids as text, and a failed slide's empty fields as "" (not NaN)."""
    return pd.read_csv(path, sep="\t", dtype={"slide_id": str, "patient_id": str}, keep_default_na=False)
