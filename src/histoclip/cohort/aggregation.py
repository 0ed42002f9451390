"""Slide- and patient-level embeddings from tile embeddings.

A slide is a bag of thousands of tiles, but few-shot classifiers, retrieval and survival models want one
vector per slide (or per patient). The simplest aggregate that stays in the model's image–text space is
the **mean of the L2-normalised tile embeddings, renormalised** — what CONCH/MI-Zero call the slide
embedding for mean pooling, and the usual baseline of slide-level linear probes. Because it stays in the
shared space, a slide embedding can still be compared with a text classifier by cosine.

The mean dilutes small regions (a few tumour tiles among stroma and fat). When a prompt set has been run,
the zero-shot tile scores tell which tiles look most like each class, so :func:`class_topk_embeddings`
adds one **per-class top-K embedding** per class: the renormalised mean of the embeddings of that class's
K best-scoring tiles (the same tiles top-K pooling picks for the zero-shot score). K is fixed in advance.

Memory: slides are read one at a time (one embedding file, plus its tile-score file), and only one vector
per slide and class is kept, so a cohort of tens of thousands of slides needs megabytes, not the tiles.

Slides without tiles (no tissue found, or an embedding job that recorded a failure) are kept as rows with
``n_tiles = 0`` and a null embedding, with a warning: a cohort table that silently loses slides is worse
than one with a gap the next step can see.

Patients: :func:`patient_embeddings` averages a patient's slide embeddings weighted by their tile counts
and renormalises, so a patient with a large and a small slide is described mostly by the large one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from histoclip import formats, store
from histoclip.errors import InputError

__all__ = [
    "PROVENANCE_KEYS",
    "aggregate_slides",
    "class_topk_embeddings",
    "patient_embeddings",
    "slide_embedding",
]

log = logging.getLogger(__name__)

#: Model-provenance keys copied from the embedding files into the slide table's metadata.
PROVENANCE_KEYS = ("model_name", "model", "architecture", "weights", "weights_sha256", "dim", "preprocessing")

#: The column prefix of per-class top-K embeddings.
CLASS_PREFIX = "embedding_"


def _unit_rows(matrix: np.ndarray, what: str) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    bad = ~np.isfinite(norms[..., 0]) | (norms[..., 0] == 0)
    if bad.any():
        raise ValueError(
            f"{what}: {int(bad.sum())} row(s) have zero or non-finite norm (first: {np.flatnonzero(bad)[:5]})"
        )
    return matrix / norms


def _unit(vector: np.ndarray, what: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError(f"{what}: the mean embedding has zero or non-finite norm (tiles cancel out)")
    return vector / norm


def slide_embedding(embeddings: np.ndarray) -> np.ndarray:
    """One slide's embedding ``[D]`` (float32, unit norm): the mean of its tile embeddings ``[N, D]``.

    Each tile is renormalised first (files store float16, whose rounding leaves norms a little off 1), the
    mean is taken in float64 and renormalised. Raises ``ValueError`` for a slide with no tiles: the caller
    decides what an empty slide becomes (:func:`aggregate_slides` records a null).
    """
    tiles = np.asarray(embeddings, dtype=np.float64)
    if tiles.ndim != 2:
        raise ValueError(f"tile embeddings must be [tiles, dim], got shape {tiles.shape}")
    if tiles.shape[0] == 0:
        raise ValueError("a slide with no tiles has no embedding")
    mean = _unit_rows(tiles, "tile embeddings").mean(axis=0)
    return _unit(mean, "slide embedding").astype(np.float32)


def class_topk_embeddings(embeddings: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Per-class top-K embeddings ``[C, D]`` (float32, unit rows) from tiles ``[N, D]`` and scores ``[N, C]``.

    Row ``c`` is the renormalised mean of the (renormalised) embeddings of the ``min(k, N)`` tiles with the
    highest score for class ``c`` — the tiles top-K pooling uses for that class's zero-shot score. Ties are
    broken by tile order (stable), so the result is reproducible.
    """
    tiles = np.asarray(embeddings, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if tiles.ndim != 2 or scores.ndim != 2 or scores.shape[0] != tiles.shape[0]:
        raise ValueError(f"need tiles [N, D] and scores [N, C] with the same N, got {tiles.shape} and {scores.shape}")
    if tiles.shape[0] == 0:
        raise ValueError("a slide with no tiles has no class embeddings")
    if k < 1:
        raise ValueError(f"top-K needs k >= 1, got {k}")
    tiles = _unit_rows(tiles, "tile embeddings")
    kk = min(int(k), tiles.shape[0])
    out = np.empty((scores.shape[1], tiles.shape[1]), dtype=np.float64)
    for c in range(scores.shape[1]):
        top = np.argsort(-scores[:, c], kind="stable")[:kk]
        out[c] = _unit(tiles[top].mean(axis=0), f"top-{kk} embedding of class column {c}")
    return out.astype(np.float32)


def _read_tile_scores(
    path: str | Path, classes: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    x, y, by_class = formats.read_tile_scores(path)
    found = list(by_class)
    if classes is not None and list(classes) != found:
        raise InputError(
            f"tile scores have classes {found}, other slides of the cohort {list(classes)}",
            where=str(path),
            fix="re-run the zero-shot rule so that every slide is scored with the same prompt set",
        )
    return x, y, np.column_stack(list(by_class.values())), found


def aggregate_slides(
    slide_ids: Sequence[str],
    patient_ids: Sequence[str],
    embedding_files: Sequence[str | Path],
    out_path: str | Path | None = None,
    *,
    tile_score_files: Sequence[str | Path] | None = None,
    class_top_k: int = 50,
    extra_metadata: dict[str, Any] | None = None,
) -> pa.Table:
    """The slide table of a cohort: ``slide_id``, ``patient_id``, ``n_tiles``, ``embedding`` (+ per class).

    Reads one slide at a time. ``embedding`` is :func:`slide_embedding` (fixed_size_list<float32>, null for a
    slide with no tiles). With ``tile_score_files`` (the zero-shot rule's ``tile_scores/{slide}.parquet``, in
    the same order as ``embedding_files``), one ``embedding_<class>`` column per scored class is added
    (:func:`class_topk_embeddings` with ``class_top_k``). Metadata: the model provenance shared by every
    embedding file (an error if slides were embedded by different weights), the aggregation method, and
    ``extra_metadata``. Written atomically to ``out_path`` when given; the table is returned either way.
    """
    n = len(slide_ids)
    if not (len(patient_ids) == len(embedding_files) == n):
        raise ValueError(
            f"{n} slide ids, {len(patient_ids)} patient ids and {len(embedding_files)} embedding files: need one each"
        )
    if len(set(slide_ids)) != n:
        raise ValueError("slide ids must be unique")
    if tile_score_files is not None and len(tile_score_files) != n:
        raise ValueError(f"{len(tile_score_files)} tile-score files for {n} slides")
    read = _read_slides(slide_ids, embedding_files, tile_score_files, class_top_k)
    if read.empty:
        log.warning(
            "%d slide(s) have no tiles and get a null embedding (n_tiles 0): %s", len(read.empty), ", ".join(read.empty)
        )
    provenance = read.provenance
    dim = int(provenance["dim"]) if provenance and provenance.get("dim") else None
    if dim is None:
        dim = next((len(v) for v in read.vectors if v is not None), None)
    if dim is None:
        raise InputError(
            "no slide has tiles and the embedding files do not record the dimension", fix="check the tiling step"
        )
    columns: dict[str, pa.Array] = {
        "slide_id": pa.array(list(slide_ids), pa.string()),
        "patient_id": pa.array(list(patient_ids), pa.string()),
        "n_tiles": pa.array(read.n_tiles, pa.int64()),
        "embedding": formats.vectors_column(read.vectors, dim),
    }
    if tile_score_files is not None and read.classes is None:
        log.warning("no slide has tiles: no per-class embedding columns can be named")
    for c, cls in enumerate(read.classes or []):
        class_column = [None if v is None else v[c] for v in read.class_vectors]
        columns[f"{CLASS_PREFIX}{cls}"] = formats.vectors_column(class_column, dim)
    table = pa.table(columns)
    metadata: dict[str, Any] = {
        **(provenance or {}),
        "aggregation": "mean of L2-normalised tile embeddings, renormalised",
        "n_slides": n,
        "n_empty_slides": len(read.empty),
    }
    if tile_score_files is not None:
        metadata |= {
            "class_embeddings": "per class: renormalised mean of the class's top-K tiles by zero-shot tile score",
            "class_top_k": int(class_top_k),
            "classes": read.classes or [],
        }
    metadata |= extra_metadata or {}
    if out_path is not None:
        formats.write_slide_embeddings(out_path, table, metadata)
    existing = table.schema.metadata or {}
    return table.replace_schema_metadata(
        {**existing, **{k.encode(): store.json_value(v).encode() for k, v in metadata.items()}}
    )


@dataclass
class _SlideVectors:
    """What the aggregation reads from each slide's files, in cohort order (None for a slide without tiles)."""

    provenance: dict[str, Any] | None = None
    vectors: list[np.ndarray | None] = field(default_factory=list)
    class_vectors: list[np.ndarray | None] = field(default_factory=list)
    classes: list[str] | None = None
    n_tiles: list[int] = field(default_factory=list)
    #: "slide (status)" of every slide without tiles
    empty: list[str] = field(default_factory=list)


def _read_slides(
    slide_ids: Sequence[str],
    embedding_files: Sequence[str | Path],
    tile_score_files: Sequence[str | Path] | None,
    class_top_k: int,
) -> _SlideVectors:
    """Each slide's embedding (and per-class embeddings with ``tile_score_files``), one slide at a time; an error
    when a slide was embedded by other weights than the first, or its tile scores are of other tiles."""
    read = _SlideVectors()
    first_file = None
    for i, (slide_id, path) in enumerate(zip(slide_ids, embedding_files, strict=True)):
        x, y, tiles, meta = formats.read_tile_embeddings(path)
        this = {key: meta.get(key) for key in PROVENANCE_KEYS}
        provenance = read.provenance
        if provenance is None:
            read.provenance, first_file = this, path
        elif this["weights_sha256"] != provenance["weights_sha256"] or this["dim"] != provenance["dim"]:
            raise InputError(
                f"slide {slide_id!r} was embedded with weights {str(this['weights_sha256'])[:12]}… (dim "
                f"{this['dim']}), slide {slide_ids[0]!r} with {str(provenance['weights_sha256'])[:12]}… (dim "
                f"{provenance['dim']}, {first_file}); a slide table mixes no models",
                where=str(path),
                fix="re-run the embedding step so that every slide is embedded by the same model",
            )
        read.n_tiles.append(len(tiles))
        if len(tiles) == 0:
            read.empty.append(f"{slide_id} ({meta.get('status', 'ok')})")
            read.vectors.append(None)
            if tile_score_files is not None:
                read.class_vectors.append(None)
            continue
        read.vectors.append(slide_embedding(tiles))
        if tile_score_files is not None:
            sx, sy, scores, read.classes = _read_tile_scores(tile_score_files[i], read.classes)
            if not (np.array_equal(sx, x) and np.array_equal(sy, y)):
                raise InputError(
                    f"slide {slide_id!r}: the tile scores do not have the same tiles (x, y, order) as {path}",
                    where=str(tile_score_files[i]),
                    fix="re-run the zero-shot rule after the embeddings changed",
                )
            read.class_vectors.append(class_topk_embeddings(tiles, scores, class_top_k))
    return read


def patient_embeddings(slides: pd.DataFrame, embeddings: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Patient embeddings: per patient, the tile-weighted mean of their slide embeddings, renormalised.

    ``slides`` has ``patient_id`` and ``n_tiles`` per row of ``embeddings`` ``[n_slides, D]`` (as returned by
    :func:`histoclip.formats.read_slide_embeddings`). Slides without tiles (or a NaN embedding) carry no weight; a
    patient with none of them gets a NaN row and ``n_tiles = 0``. Returns (``patient_id``, ``n_slides``, ``n_tiles``
    DataFrame in order of first appearance, float32 matrix ``[n_patients, D]``).
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if len(slides) != len(embeddings):
        raise ValueError(f"{len(slides)} slide rows but {len(embeddings)} embeddings")
    weights = slides["n_tiles"].to_numpy(dtype=np.float64).copy()
    usable = np.isfinite(embeddings).all(axis=1) & (weights > 0)
    weights[~usable] = 0.0
    patients = list(dict.fromkeys(slides["patient_id"].astype(str)))
    index = {p: i for i, p in enumerate(patients)}
    rows = slides["patient_id"].astype(str).map(index).to_numpy()
    total = np.zeros((len(patients), embeddings.shape[1]), dtype=np.float64)
    np.add.at(total, rows[usable], weights[usable, None] * embeddings[usable])
    tiles = np.bincount(rows, weights=weights, minlength=len(patients))
    out = np.full_like(total, np.nan)
    has = tiles > 0
    norms = np.linalg.norm(total[has], axis=1, keepdims=True)
    out[has] = total[has] / norms
    frame = pd.DataFrame(
        {
            "patient_id": patients,
            "n_slides": np.bincount(rows, minlength=len(patients)),
            "n_tiles": tiles.astype(np.int64),
        }
    )
    return frame, out.astype(np.float32)
