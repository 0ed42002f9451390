"""Embedding files (``results/embeddings/{model}/{slide}.parquet``) and a model's embedding manifest.

An embedding file holds one slide's tiles: ``x``, ``y`` (level-0 corners, as in the tile file, same order) and
``embedding`` (fixed_size_list of float16 or float32, L2-normalised), with the model's provenance and the tile
file's sha256 in the footer. It is written while the slide streams (row groups), so memory stays bounded
whatever the slide size, and it appears at its final path only when complete (temporary file + rename).

The manifest (``results/embeddings/{model}.tsv``, and one per embedding shard) lists ``slide_id`` and ``path``
in sheet order: rules that read every slide's embeddings take this one file as input instead of one path per
slide (see :func:`write_embedding_manifest`).

Torch-free on purpose: statistics-only jobs (aggregation, phenotypes, clustering, few-shot) read embeddings too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from histoclip import store
from histoclip.errors import InputError

__all__ = [
    "DTYPES",
    "EmbeddingFileWriter",
    "EmbeddingFooter",
    "embedding_paths",
    "embedding_schema",
    "read_embedding_footer",
    "read_tile_embeddings",
    "write_embedding_manifest",
    "write_failed_embedding_file",
]

#: Storage dtypes of the ``embedding`` column: name → (numpy dtype, arrow type).
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}


def embedding_schema(dim: int, dtype: str) -> pa.Schema:
    return pa.schema(
        [("x", pa.int64()), ("y", pa.int64()), ("embedding", pa.list_(DTYPES[dtype][1], dim))],
    )


class EmbeddingFileWriter:
    """Streams one slide's embeddings into row groups of a temporary Parquet file; ``commit`` renames it.

    ``x`` and ``y`` are the slide's tiles in the order their embeddings will be added; ``metadata`` goes into the
    footer (JSON-encoded, with the package versions, as :func:`histoclip.store.write_table_atomic` writes it).
    """

    def __init__(
        self,
        path: str | Path,
        x: np.ndarray,
        y: np.ndarray,
        dim: int,
        dtype: str,
        metadata: Mapping[str, Any],
        row_group_rows: int,
    ) -> None:
        self.x, self.y, self.dim, self.dtype, self.row_group_rows = x, y, dim, dtype, row_group_rows
        self.final = Path(path)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        store.remove_stale_temporaries(self.final)  # a killed run's partial file of this slide
        self.tmp = self.final.parent / f".{self.final.name}.{os.getpid()}.tmp"
        schema = embedding_schema(dim, dtype)
        meta = {k: store.json_value(v) for k, v in metadata.items()}
        meta[store.PROVENANCE_KEY] = store.json_value({"versions": store.package_versions()})
        self.schema = schema.with_metadata(meta)
        # Dictionary encoding only for the coordinates: on float16 embeddings it saves ~5 % of the file and makes
        # every later read 2-4x slower (measured on 2,000 x 5,000 tiles: 260 s vs 79 s of phenotype fitting).
        self.writer = pq.ParquetWriter(self.tmp, self.schema, use_dictionary=["x", "y"])
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.written = 0

    def add(self, embeddings: np.ndarray) -> None:
        self.pending.append(embeddings.astype(DTYPES[self.dtype][0], copy=False))
        self.pending_rows += len(embeddings)
        if self.pending_rows >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        values = np.concatenate(self.pending)
        start, stop = self.written, self.written + len(values)
        flat = pa.array(values.reshape(-1), type=DTYPES[self.dtype][1])
        table = pa.Table.from_arrays(
            [
                pa.array(self.x[start:stop], pa.int64()),
                pa.array(self.y[start:stop], pa.int64()),
                pa.FixedSizeListArray.from_arrays(flat, self.dim),
            ],
            schema=self.schema,
        )
        self.writer.write_table(table)
        self.written = stop
        self.pending, self.pending_rows = [], 0

    def commit(self, what: str) -> None:
        """Write what is pending and move the file to its final path; ``what`` names the slide in the error
        raised (after removing the file) when fewer embeddings than tiles were added."""
        self._flush()
        self.writer.close()
        if self.written != len(self.x):
            self.abort()
            raise RuntimeError(f"{what}: wrote {self.written} of {len(self.x)} tiles")
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # already closed or broken: the temp file goes anyway
            self.writer.close()
        self.tmp.unlink(missing_ok=True)


def write_failed_embedding_file(path: str | Path, dim: int, dtype: str, metadata: Mapping[str, Any]) -> None:
    """An empty embedding file (``metadata`` says status "error" and why): the slide keeps its place."""
    store.write_table_atomic(path, embedding_schema(dim, dtype).empty_table(), metadata)


@dataclass(frozen=True)
class EmbeddingFooter:
    """What the footer of an embedding file says (read without touching the data)."""

    path: str
    n_rows: int
    dim: int
    metadata: dict[str, Any]

    @property
    def weights_sha256(self) -> str | None:
        return self.metadata.get("weights_sha256")


def read_embedding_footer(path: str | Path) -> EmbeddingFooter:
    """Rows, dimension and metadata of an embedding file from its footer only (cheap for any slide size)."""
    file = pq.ParquetFile(path)
    return EmbeddingFooter(
        str(path),
        file.metadata.num_rows,
        file.schema_arrow.field("embedding").type.list_size,
        store.read_metadata(path),
    )


def read_tile_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(x, y, embeddings [N, D] float32, metadata) of one slide's embedding file."""
    table = pq.read_table(path)
    meta = store.read_metadata(path)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    return table.column("x").to_numpy(), table.column("y").to_numpy(), values, meta


def write_embedding_manifest(path: str | Path, slide_ids: Sequence[str], files: Sequence[str | Path]) -> None:
    """One line per slide (slide_id, path) in sheet order: the file that stands for a model's embeddings.

    Why: rules that read every slide's embeddings take this one file as input instead of 10,000 paths each;
    Snakemake then resolves the 10,000 files once (for this file's rule) rather than once per such rule, which
    is most of what planning a large cohort costs. The manifest is rewritten (new mtime) whenever an embedding
    file changes, so everything downstream still re-runs when it should.
    """
    if len(slide_ids) != len(files):
        raise ValueError(f"{len(slide_ids)} slide ids but {len(files)} embedding files")
    frame = pd.DataFrame({"slide_id": list(slide_ids), "path": [str(f) for f in files]})
    store.write_text_atomic(path, frame.to_csv(sep="\t", index=False, lineterminator="\n"))


def embedding_paths(manifest: str | Path, slide_ids: Sequence[str] | None = None) -> list[str]:
    """The embedding files of a manifest (:func:`write_embedding_manifest`), in its order; with ``slide_ids``,
    checked to be those slides in that order (a stale manifest would silently pair slides with other files)."""
    frame = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
    if slide_ids is not None and frame["slide_id"].tolist() != list(slide_ids):
        raise InputError(
            "the embedding manifest does not list the sheet's slides in the sheet's order",
            where=str(manifest),
            fix="re-run the workflow: Snakemake rewrites the manifest when the sheet changes (or delete the file)",
        )
    return frame["path"].tolist()
