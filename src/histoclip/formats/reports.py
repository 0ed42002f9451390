"""Report embeddings (``results/report_alignment/{model}/reports.parquet``): one pooled text embedding per report.

Columns: ``report_id`` (the slide or patient the report belongs to), ``n_chunks`` (sentences or sections it
was split into), ``embedding`` (fixed_size_list<float32>[D], unit norm: the mean of the chunks' unit-norm text
embeddings, renormalised). Metadata: the key column (slide_id or patient_id), the reports table's sha256, the
chunking settings and the text model's provenance, so a cached file is traceable to the text and the weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histoclip import store

__all__ = ["read_report_embeddings", "write_report_embeddings"]


def write_report_embeddings(
    path: str | Path,
    report_ids: Sequence[str],
    n_chunks: Sequence[int],
    embeddings: np.ndarray,
    metadata: Mapping[str, Any],
) -> None:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(report_ids):
        raise ValueError(f"{len(report_ids)} reports but embeddings of shape {embeddings.shape}")
    dim = embeddings.shape[1]
    table = pa.table(
        {
            "report_id": pa.array(list(report_ids), pa.string()),
            "n_chunks": pa.array(list(n_chunks), pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), dim),
        }
    )
    store.write_table_atomic(path, table, dict(metadata))


def read_report_embeddings(path: str | Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(report ids, embeddings [R, D] float32, metadata)."""
    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, column.type.list_size)
    return table.column("report_id").to_pylist(), values, store.read_metadata(path)
