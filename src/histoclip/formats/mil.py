"""MIL files: attention per tile (``results/mil/{model}/{task}/attention/{slide}.parquet``).

One Parquet file per slide: ``x``, ``y`` (level-0 corners, the embedding file's rows and order) and
``attention`` (float32, summing to 1 over the slide's tiles: the weight each tile had in the slide's call),
with ``slide_id``, ``task``, ``mil_model`` and ``fold`` (the cross-validation fold whose model called the slide,
or ``ensemble``) in the footer. Exports (QuPath measurements) read attention from here, never from the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histoclip import store
from histoclip.errors import InputError

__all__ = ["ATTENTION_COLUMNS", "read_attention", "write_attention"]

ATTENTION_COLUMNS = ("x", "y", "attention")


def write_attention(
    path: str | Path, x: np.ndarray, y: np.ndarray, attention: np.ndarray, metadata: Mapping[str, Any]
) -> None:
    """One slide's tile attention (atomically), in the embedding file's tile order."""
    if not len(x) == len(y) == len(attention):
        raise ValueError(f"{len(x)} x, {len(y)} y and {len(attention)} attention values for one slide")
    table = pa.table(
        {
            "x": pa.array(np.asarray(x), pa.int64()),
            "y": pa.array(np.asarray(y), pa.int64()),
            "attention": pa.array(np.asarray(attention, dtype=np.float32), pa.float32()),
        }
    )
    store.write_table_atomic(path, table, metadata)


def read_attention(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(x, y, attention, footer metadata) of one slide's attention file."""
    table = pq.read_table(path)
    if list(table.column_names) != list(ATTENTION_COLUMNS):
        raise InputError(
            f"not an attention file: columns {table.column_names} (expected {list(ATTENTION_COLUMNS)})",
            where=str(path),
            fix="re-run the mil rule that writes attention/",
        )
    return (
        table.column("x").to_numpy(),
        table.column("y").to_numpy(),
        table.column("attention").to_numpy(),
        store.read_metadata(path),
    )
