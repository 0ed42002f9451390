"""Retrieval in the image–text space: text → tiles across a cohort, and slide → most similar slides.

Why: a pathologist checks what a model "means" by a phrase by looking at the tiles it finds for it ("tumour
necrosis" should bring back necrosis), and finds comparable cases by slide similarity. Both run over cohorts
of thousands of slides, so nothing here holds the cohort's tiles at once: tiles are scored slide by slide
against every query and only a running top-N per query is kept; slides are compared through one vector
each (the mean of their tile embeddings, renormalised: :func:`histoclip.cohort.aggregation.slide_embedding`), in
blocks.

Ties are broken by stream order (earlier slide, then earlier tile), so results do not depend on how the
stream is chunked and equal a full sort of the whole cohort.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip.cohort.aggregation import slide_embedding
from histoclip.config import default_config
from histoclip.errors import InputError
from histoclip.formats import read_slide_embeddings, read_tile_embeddings
from histoclip.plots import FigureStyle, new_figure, save_figure, write_tsv
from histoclip.store import write_text_atomic
from histoclip.tiling import slide as wsi
from histoclip.zeroshot.evidence import TileLayout, read_tiles
from histoclip.zeroshot.prompts import query_slug, query_slugs

log = logging.getLogger(__name__)

__all__ = [
    "RunningTopN",
    "SlideVectors",
    "precision_at_k",
    "query_slug",
    "query_slugs",
    "query_gallery",
    "retrieved_tiles",
    "slide_neighbours",
    "text_to_tiles",
]

TILE_COLUMNS = ["query", "rank", "slide_id", "x", "y", "score"]
NEIGHBOUR_COLUMNS = ["slide_id", "rank", "neighbour_id", "cosine"]


class RunningTopN:
    """The ``n`` highest-scoring tiles per query seen so far, over a stream of slides.

    Memory is O(n × queries) whatever the cohort size. Ranking is by score (descending), then stream
    position (slide order, then row), exactly as a stable sort of the whole cohort would rank.
    """

    def __init__(self, n_queries: int, n: int) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n = n
        self.n_queries = n_queries
        self._score = [np.zeros(0, np.float32) for _ in range(n_queries)]
        self._slide = [np.zeros(0, np.int64) for _ in range(n_queries)]
        self._row = [np.zeros(0, np.int64) for _ in range(n_queries)]

    def update(self, scores: np.ndarray, slide_index: int) -> None:
        """Offer one slide's tiles: ``scores`` is [tiles, queries]. Slides must come in stream order."""
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim != 2 or scores.shape[1] != self.n_queries:
            raise ValueError(f"scores must be [tiles, {self.n_queries}], got {scores.shape}")
        if scores.shape[0] == 0:
            return
        for q in range(self.n_queries):
            column = scores[:, q]
            if column.size > self.n:
                # Every tile that ties with the n-th best stays a candidate: order among ties is decided below.
                threshold = np.partition(column, column.size - self.n)[column.size - self.n]
                rows = np.flatnonzero(column >= threshold)
            else:
                rows = np.arange(column.size)
            score = np.concatenate([self._score[q], column[rows]])
            slide = np.concatenate([self._slide[q], np.full(rows.size, slide_index, np.int64)])
            row = np.concatenate([self._row[q], rows.astype(np.int64)])
            keep = np.lexsort((row, slide, -score))[: self.n]
            self._score[q], self._slide[q], self._row[q] = score[keep], slide[keep], row[keep]

    def result(self, query_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, slide indices, rows) of one query, best first (fewer than n when the cohort is smaller)."""
        return self._score[query_index], self._slide[query_index], self._row[query_index]


def _check_weights(meta: Mapping[str, Any], weights_sha256: str | None, path: str | os.PathLike[str]) -> None:
    if weights_sha256 is not None and meta.get("weights_sha256") != weights_sha256:
        raise InputError(
            f"embeddings were made with weights {str(meta.get('weights_sha256'))[:12]}…, the queries are encoded "
            f"with {weights_sha256[:12]}…",
            where=str(path),
            fix="re-run the embedding step with this model",
        )


def text_to_tiles(
    queries: Sequence[str],
    text_embeddings: np.ndarray,
    slide_ids: Sequence[str],
    embedding_files: Sequence[str | os.PathLike[str]],
    top_n: int,
    *,
    weights_sha256: str | None = None,
) -> pd.DataFrame:
    """The ``top_n`` tiles of the cohort by cosine to each query, streamed slide by slide.

    ``text_embeddings`` [queries, dim] are L2-normalised text embeddings (as ``LoadedModel.encode_texts``
    gives); tile embeddings are L2-normalised in the files, so the dot product is the cosine. With
    ``weights_sha256`` every embedding file must come from those weights. Returns (query, rank, slide_id, x,
    y, score), ranks from 1, queries in the given order.
    """
    text = np.asarray(text_embeddings, dtype=np.float32)
    if text.ndim != 2 or text.shape[0] != len(queries):
        raise ValueError(f"text_embeddings must be [{len(queries)}, dim], got {text.shape}")
    top = RunningTopN(len(queries), top_n)
    coordinates: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if len(slide_ids) != len(embedding_files):
        raise ValueError(f"{len(slide_ids)} slide ids but {len(embedding_files)} embedding files")
    for index, path in enumerate(embedding_files):
        x, y, embeddings, meta = read_tile_embeddings(path)
        _check_weights(meta, weights_sha256, path)
        if len(x) == 0:
            continue
        if embeddings.shape[1] != text.shape[1]:
            raise InputError(
                f"embedding dimension {embeddings.shape[1]} differs from the text embeddings' {text.shape[1]}",
                where=str(path),
                fix="embed the cohort and encode the queries with the same model",
            )
        top.update(embeddings @ text.T, index)
        # Keep coordinates only of slides that still hold a place in some top-N (bounded by n × queries).
        coordinates[index] = (x, y)
        alive = {int(s) for q in range(len(queries)) for s in top.result(q)[1]}
        coordinates = {k: v for k, v in coordinates.items() if k in alive}
    rows = []
    for q, query in enumerate(queries):
        scores, slides, tile_rows = top.result(q)
        for rank, (score, s, r) in enumerate(zip(scores, slides, tile_rows, strict=True)):
            x, y = coordinates[int(s)]
            rows.append((query, rank + 1, slide_ids[int(s)], int(x[r]), int(y[r]), float(score)))
    return pd.DataFrame(rows, columns=TILE_COLUMNS)


@dataclass(frozen=True)
class SlideVectors:
    """One vector per slide (slides without tiles left out, and listed in ``skipped``)."""

    slide_ids: list[str]
    vectors: np.ndarray
    skipped: list[str]

    @classmethod
    def from_embedding_files(
        cls, slide_ids: Sequence[str], embedding_files: Sequence[str | os.PathLike[str]]
    ) -> SlideVectors:
        """Slide embeddings (:func:`histoclip.cohort.aggregation.slide_embedding`: mean of the tile embeddings,
        renormalised) computed by streaming the files: memory holds one slide's tiles plus one vector per slide."""
        kept, vectors, skipped = [], [], []
        weights: tuple[str, Any] | None = None
        for slide_id, path in zip(slide_ids, embedding_files, strict=True):
            _, _, embeddings, meta = read_tile_embeddings(path)
            if weights is None:
                weights = (str(path), meta.get("weights_sha256"))
            elif meta.get("weights_sha256") != weights[1]:
                raise InputError(
                    f"embedded with weights {str(meta.get('weights_sha256'))[:12]}…, {weights[0]} with "
                    f"{str(weights[1])[:12]}…: slides embedded by different models cannot be compared",
                    where=str(path),
                    fix="re-run the embedding step so that every slide is embedded by the same model",
                )
            try:
                vector = slide_embedding(embeddings)
            except ValueError as exc:  # no tiles, or tiles that cancel out: no direction to compare
                log.warning("slide %s has no slide embedding and is left out of slide retrieval: %s", slide_id, exc)
                skipped.append(slide_id)
                continue
            kept.append(slide_id)
            vectors.append(vector)
        dim = vectors[0].size if vectors else 0
        return cls(kept, np.stack(vectors) if vectors else np.zeros((0, dim), np.float32), skipped)

    @classmethod
    def from_slide_table(cls, path: str | os.PathLike[str], slide_ids: Sequence[str] | None = None) -> SlideVectors:
        """The slide embeddings of the aggregation step's slide table (results/slides/{model}.parquet), in
        ``slide_ids`` order when given (every id must be in the table); rows without an embedding are skipped."""
        frame, matrix = read_slide_embeddings(path)
        ids = frame["slide_id"].astype(str).tolist()
        index = {sid: i for i, sid in enumerate(ids)}
        wanted = list(slide_ids) if slide_ids is not None else ids
        missing = [sid for sid in wanted if sid not in index]
        if missing:
            raise InputError(
                f"{len(missing)} slide(s) of the cohort are not in the slide table (first: {missing[0]!r})",
                where=str(path),
                fix="re-run the aggregation step for the current cohort sheet",
            )
        rows = np.array([index[sid] for sid in wanted], dtype=np.int64)
        usable = np.isfinite(matrix[rows]).all(axis=1) if rows.size else np.zeros(0, bool)
        kept = [sid for sid, ok in zip(wanted, usable, strict=True) if ok]
        skipped = [sid for sid, ok in zip(wanted, usable, strict=True) if not ok]
        return cls(kept, matrix[rows[usable]].astype(np.float32), skipped)


def slide_neighbours(
    slide_ids: Sequence[str],
    vectors: np.ndarray,
    k: int,
    *,
    patient_ids: Sequence[str] | None = None,
    block: int = 1024,
) -> pd.DataFrame:
    """The ``k`` most similar other slides of each slide by cosine of slide vectors.

    With ``patient_ids`` a slide's neighbours exclude every slide of the same patient: two slides of one
    patient are near-duplicates, and counting them would flatter any retrieval score. Queries are processed
    in blocks of ``block`` slides, so memory is O(block × slides), not slides². Ties go to the earlier slide.
    Returns (slide_id, rank, neighbour_id, cosine); a slide with fewer than k candidates gets fewer rows.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    n = len(slide_ids)
    if vectors.shape[0] != n:
        raise ValueError(f"{n} slide ids but {vectors.shape[0]} vectors")
    patients = np.asarray(patient_ids if patient_ids is not None else slide_ids, dtype=object)
    order = np.arange(n)
    rows = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        cosine = vectors[start:stop] @ vectors.T
        for i in range(start, stop):
            row = cosine[i - start]
            allowed = patients != patients[i] if patient_ids is not None else order != i
            allowed &= order != i
            candidates = np.flatnonzero(allowed)
            ranked = candidates[np.lexsort((candidates, -row[candidates]))][:k]
            rows.extend((slide_ids[i], r + 1, slide_ids[j], float(row[j])) for r, j in enumerate(ranked))
    return pd.DataFrame(rows, columns=NEIGHBOUR_COLUMNS)


def precision_at_k(
    neighbours: pd.DataFrame,
    labels: Mapping[str, str | None],
    ks: Iterable[int],
    *,
    queries: Iterable[str] | None = None,
    patient_ids: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Mean fraction of a slide's first k neighbours that share its label, over labelled query slides.

    ``queries`` restricts which slides are scored (e.g. not the training split); neighbours may be any slide
    of the table, and an unlabelled neighbour counts as not sharing. ``chance`` is the same measure for
    neighbours drawn at random from the candidates each query had (all other labelled-or-not slides in the
    table, minus its patient's when ``patient_ids`` is given), so the number can be read against it.
    """
    query_set = set(queries) if queries is not None else set(neighbours["slide_id"])
    grouped = {sid: frame.sort_values("rank")["neighbour_id"].tolist() for sid, frame in neighbours.groupby("slide_id")}
    database = sorted(set(neighbours["slide_id"]) | set(neighbours["neighbour_id"]))
    scored = [s for s in grouped if s in query_set and labels.get(s)]
    # Chance: label counts of the candidates each query had (the table's slides minus itself and its patient's).
    counts = pd.Series([labels.get(d) for d in database], dtype=object).value_counts().to_dict()
    group_of = {d: (patient_ids.get(d) if patient_ids is not None else d) for d in database}
    groups: dict[Any, list[str]] = {}
    for d in database:
        groups.setdefault(group_of[d], []).append(d)

    def chance_of(sid: str) -> float:
        excluded = groups[group_of[sid]] if sid in group_of else [sid]
        n_candidates = len(database) - len(excluded)
        same = counts.get(labels[sid], 0) - sum(labels.get(d) == labels[sid] for d in excluded)
        return same / n_candidates if n_candidates > 0 else np.nan

    out: dict[str, Any] = {"n_queries": len(scored), "n_slides": len(database), "precision_at_k": {}, "chance": {}}
    per_label: dict[str, dict[str, float]] = {}
    for k in sorted(set(ks)):
        if k < 1:
            continue
        values, chances, by_label = [], [], {}
        for sid in scored:
            label = labels[sid]
            hits = [labels.get(n) == label for n in grouped[sid][:k]]
            if len(hits) < k:
                continue  # fewer candidates than k: this k says nothing about the slide
            values.append(float(np.mean(hits)))
            chances.append(chance_of(sid))
            by_label.setdefault(label, []).append(values[-1])
        out["precision_at_k"][str(k)] = float(np.mean(values)) if values else None
        out["chance"][str(k)] = float(np.nanmean(chances)) if chances else None
        for label, vals in by_label.items():
            per_label.setdefault(label, {})[str(k)] = float(np.mean(vals))
    out["per_label"] = per_label
    return out


def retrieved_tiles(
    rows: pd.DataFrame,
    slide_paths: Mapping[str, str | os.PathLike[str]],
    tile_files: Mapping[str, str | os.PathLike[str]],
) -> list[np.ndarray]:
    """Pixels of the tiles in ``rows`` (slide_id, x, y), in row order; each slide is opened once."""
    images: list[np.ndarray] = [np.zeros((1, 1, 3), np.uint8)] * len(rows)
    positions = np.arange(len(rows))
    for slide_id, group in rows.assign(_position=positions).groupby("slide_id", sort=False):
        if slide_id not in slide_paths or slide_id not in tile_files:
            raise InputError(
                f"retrieved slide {slide_id!r} is not in the cohort sheet",
                where="retrieval table",
                fix="re-run retrieval with the current cohort sheet",
            )
        layout = TileLayout.from_tile_file(tile_files[slide_id])
        with wsi.open_wsi(slide_paths[slide_id], str(slide_id)) as slide:
            tiles = read_tiles(slide, layout, group["x"].to_numpy(), group["y"].to_numpy())
        for i, tile in zip(group["_position"], tiles, strict=True):
            images[int(i)] = tile
    return images


def query_gallery(
    table: pd.DataFrame,
    query: str,
    slide_paths: Mapping[str, str | os.PathLike[str]],
    tile_files: Mapping[str, str | os.PathLike[str]],
    out_stem: str | os.PathLike[str],
    *,
    style: FigureStyle | None = None,
    columns: int = 6,
    truth: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Draw the retrieved tiles of one query (rank, slide, score under each) and write the rows shown as TSV.

    Only the tiles shown are read from their slides (at the tile file's read level, as the model saw them).
    ``truth`` (one label per row, e.g. the demo's class maps) adds a line under each tile and a column.
    ``style`` defaults to the config schema's.
    """
    style = style or FigureStyle.from_config(default_config())
    rows = table[table["query"] == query].sort_values("rank").reset_index(drop=True)
    images = retrieved_tiles(rows, slide_paths, tile_files)
    data = rows.copy()
    if truth is not None:
        data["truth"] = list(truth)
    n = max(len(rows), 1)
    ncols = min(columns, n)
    nrows = -(-n // ncols)
    figure = new_figure(style, width_in=max(style.width_in, 1.15 * ncols), height_in=0.5 + 1.45 * nrows)
    with style.context():
        figure.suptitle(f"text → tiles: \u201c{query}\u201d (top {len(rows)} of the cohort by cosine)")
        axes = np.atleast_1d(figure.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax in axes:
            ax.set_axis_off()
        if rows.empty:
            axes[0].text(0.5, 0.5, "no tiles in the cohort", ha="center", va="center")
        for i, row in rows.iterrows():
            ax = axes[i]
            ax.imshow(images[i])
            label = f"#{row['rank']}  {row['score']:.3f}\n{row['slide_id']}"
            if truth is not None:
                label += f"\ntruth: {truth[i]}"
            ax.set_title(label, fontsize=style.font_size - 2)
    save_figure(figure, out_stem, style, data=data, title=f"text to tiles: {query}", report_copy=True)
    return data


def write_neighbour_outputs(
    neighbours: pd.DataFrame, summary: Mapping[str, Any], table_path: str | Path, summary_path: str | Path
) -> None:
    write_tsv(neighbours, table_path)
    write_text_atomic(summary_path, json.dumps(summary, indent=2, default=float) + "\n")
