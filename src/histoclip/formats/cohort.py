"""Cohort-level files: slide embeddings (``results/slides/{model}.parquet``), phenotype compositions
(``results/phenotypes/{model}/composition.tsv`` and ``class_composition.tsv``), the phenotype table
(``phenotypes.tsv``) and per-tile assignments (``assignments/{slide}.parquet``: x, y, phenotype, distance), and the
one text reader of slide-level TSV tables that analyses join on ``slide_id``.

The slide-embedding file has ``slide_id``, ``patient_id``, ``n_tiles``, ``embedding`` and optionally one
``embedding_<class>`` column per class, each a fixed_size_list<float32> with a null where a slide has no tiles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from histoclip import store
from histoclip.errors import InputError

__all__ = [
    "PHENOTYPE_PREFIX",
    "read_composition",
    "read_phenotype_assignments",
    "read_phenotype_table",
    "read_slide_embeddings",
    "read_slide_tsv",
    "slide_embedding_columns",
    "vectors_column",
    "write_composition",
    "write_slide_embeddings",
]

#: Prefix of the composition tables' per-phenotype fraction columns (``phenotype_00`` …).
PHENOTYPE_PREFIX = "phenotype_"


def vectors_column(vectors: Sequence[np.ndarray | None], dim: int) -> pa.Array:
    """A fixed_size_list<float32>[dim] column with nulls where a vector is None."""
    flat = np.zeros((len(vectors), dim), dtype=np.float32)
    valid = np.zeros(len(vectors), dtype=bool)
    for i, vector in enumerate(vectors):
        if vector is not None:
            flat[i] = vector
            valid[i] = True
    values = pa.array(flat.reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))


def write_slide_embeddings(path: str | Path, table: pa.Table, metadata: Mapping[str, Any]) -> None:
    store.write_table_atomic(path, table, metadata)


def slide_embedding_columns(path: str | Path) -> list[str]:
    """The columns of a slide-embedding file (its schema only: no rows are read)."""
    return pq.read_schema(path).names


def read_slide_embeddings(path: str | Path, column: str = "embedding") -> tuple[pd.DataFrame, np.ndarray]:
    """(slide_id / patient_id / n_tiles as a DataFrame, embeddings ``[n, D]`` float32) of a slide table.

    Rows of slides without an embedding are NaN in the matrix (test with ``np.isnan(m).any(axis=1)``).
    """
    table = pq.read_table(path)
    if column not in table.schema.names:
        raise InputError(
            f"no column {column!r} (has {table.schema.names})",
            where=str(path),
            fix="pick an existing embedding column, or enable per-class embeddings in the aggregation config",
        )
    frame = table.select(["slide_id", "patient_id", "n_tiles"]).to_pandas()
    return frame, _matrix(table.column(column).combine_chunks())


def _matrix(column: pa.Array) -> np.ndarray:
    dim = column.type.list_size
    values = column.flatten() if column.null_count == 0 else None
    if values is not None:
        return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    out = np.full((len(column), dim), np.nan, dtype=np.float32)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    # .values is the child array over all slots, nulls included (fixed size), so rows line up by index
    child = column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    out[valid] = child[column.offset : column.offset + len(column)][valid]
    return out


def write_composition(path: str | Path, table: pd.DataFrame) -> None:
    """A composition table (phenotype or class fractions per slide), as every TSV of the workflow is written."""
    store.write_tsv(table, path)


def read_composition(path: str | Path) -> pd.DataFrame:
    """A phenotype composition table (``slide_id``, ``patient_id``, ``n_tiles``, ``phenotype_00`` …)."""
    table = pd.read_csv(path, sep="\t", dtype={"slide_id": str, "patient_id": str})
    columns = [c for c in table.columns if c.startswith(PHENOTYPE_PREFIX)]
    if not columns or not {"slide_id", "patient_id", "n_tiles"} <= set(table.columns):
        raise InputError(
            "is not a phenotype composition table (slide_id, patient_id, n_tiles, phenotype_00 …)",
            where=str(path),
            fix="re-run the phenotypes rule",
        )
    return table


def read_phenotype_table(path: str | Path) -> pd.DataFrame:
    """``phenotypes.tsv``: one row per phenotype (``phenotype_00`` …) in number order, with its size and, when a
    prompt set named it, ``nearest_class`` ("" where unnamed)."""
    table = pd.read_csv(path, sep="\t", dtype={"phenotype": str, "nearest_class": str}, keep_default_na=False)
    if "phenotype" not in table.columns or not table["phenotype"].str.startswith(PHENOTYPE_PREFIX).all():
        raise InputError(
            "is not a phenotype table (a phenotype column of phenotype_00 …)",
            where=str(path),
            fix="re-run the phenotypes rule",
        )
    if "nearest_class" not in table.columns:
        table["nearest_class"] = ""
    return table


def read_phenotype_assignments(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, phenotype number [N] int, distance to its centroid [N] float32) of one slide's assignment file."""
    table = pq.read_table(path)
    missing = {"x", "y", "phenotype", "distance"} - set(table.column_names)
    if missing:
        raise InputError(
            f"is not a phenotype assignment file: no column(s) {sorted(missing)}",
            where=str(path),
            fix="re-run the phenotypes rule",
        )
    return (
        table.column("x").to_numpy(),
        table.column("y").to_numpy(),
        table.column("phenotype").to_numpy().astype(np.int64),
        table.column("distance").to_numpy().astype(np.float32),
    )


def read_slide_tsv(path: str | Path, *, kind: str, required: Sequence[str]) -> pd.DataFrame:
    """A slide-level TSV (calls, compositions, clusters) as text (``slide_id`` unique), with errors naming the
    file: for analyses that join several such tables and decide themselves which columns are numbers."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", where=f"{kind} {path}", fix="run the stage that writes it")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise InputError(
            f"cannot be read ({exc})", where=f"{kind} {path}", fix="re-run the stage that writes it"
        ) from exc
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(
            f"missing column(s) {missing}; found {list(table.columns)}", where=f"{kind} {path}", fix="re-run its stage"
        )
    duplicated = table["slide_id"][table["slide_id"].duplicated()]
    if len(duplicated):
        raise InputError(f"duplicate slide ids {_ids(duplicated)}", where=f"{kind} {path}", fix="re-run its stage")
    return table


def _ids(ids: Iterable[Any], limit: int = 20) -> str:
    ids = [str(i) for i in ids]
    shown = ", ".join(ids[:limit])
    return shown + (f" … and {len(ids) - limit} more" if len(ids) > limit else "")
