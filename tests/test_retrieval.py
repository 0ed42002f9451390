"""Retrieval: streamed text → tiles top-N against a full sort, slide vectors and neighbours against scikit-learn,
precision@k on a hand-checked example, and the gallery reading the right tiles from a real pyramid TIFF."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics.pairwise import cosine_similarity

from histoclip import store
from histoclip.cohort.aggregation import aggregate_slides
from histoclip.config import default_config
from histoclip.demo import write_pyramid_tiff
from histoclip.errors import InputError
from histoclip.plots import FigureStyle
from histoclip.tiling.grid import TilingParams, run_tiling
from histoclip.zeroshot.retrieval import (
    RunningTopN,
    SlideVectors,
    precision_at_k,
    query_gallery,
    query_slugs,
    retrieved_tiles,
    slide_neighbours,
    text_to_tiles,
)

WEIGHTS = "ab" * 32


def brute_force(slides: list[np.ndarray], n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per query: a full stable sort of every tile of the cohort (score desc, then slide, then row)."""
    score = np.concatenate(slides)
    slide = np.concatenate([np.full(len(s), i) for i, s in enumerate(slides)])
    row = np.concatenate([np.arange(len(s)) for s in slides])
    out = []
    for q in range(score.shape[1]):
        order = np.lexsort((row, slide, -score[:, q]))[:n]
        out.append((score[order, q], slide[order], row[order]))
    return out


@pytest.mark.parametrize("n", [1, 7, 40, 500])
def test_running_top_n_equals_a_full_sort_with_ties(n):
    rng = np.random.default_rng(n)
    sizes = [30, 0, 1, 55, 12, 80]
    # scores on a coarse grid: many exact ties, also across slides and at the cut-off
    slides = [np.round(rng.uniform(-1, 1, (size, 3)), 1).astype(np.float32) for size in sizes]
    top = RunningTopN(3, n)
    for i, scores in enumerate(slides):
        top.update(scores, i)
    for q, (score, slide, row) in enumerate(brute_force(slides, n)):
        got = top.result(q)
        assert len(got[0]) == min(n, sum(sizes))
        np.testing.assert_array_equal(got[0], score)
        np.testing.assert_array_equal(got[1], slide)
        np.testing.assert_array_equal(got[2], row)


def test_running_top_n_all_equal_scores_keeps_stream_order():
    top = RunningTopN(1, 4)
    top.update(np.ones((3, 1)), 0)
    top.update(np.ones((3, 1)), 1)
    assert list(zip(top.result(0)[1], top.result(0)[2], strict=True)) == [(0, 0), (0, 1), (0, 2), (1, 0)]


def write_embeddings(path, x, y, embeddings, weights=WEIGHTS, dtype=np.float16):
    dim = embeddings.shape[1]
    values = pa.array(embeddings.astype(dtype).ravel())
    table = pa.table(
        {
            "x": pa.array(x, pa.int64()),
            "y": pa.array(y, pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
        }
    )
    store.write_table_atomic(path, table, {"weights_sha256": weights, "dim": dim})


def unit(rng, shape):
    v = rng.normal(size=shape)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture()
def cohort(tmp_path):
    rng = np.random.default_rng(5)
    ids, files, embs = [], [], []
    for i, n in enumerate([40, 0, 25, 60]):
        emb = unit(rng, (n, 16)).astype(np.float16)
        x, y = np.arange(n) * 224, np.full(n, i * 1000)
        path = tmp_path / f"s{i}.parquet"
        write_embeddings(path, x, y, emb)
        ids.append(f"s{i}")
        files.append(path)
        embs.append(emb.astype(np.float32))
    return ids, files, embs, rng


def test_text_to_tiles_equals_brute_force_over_the_cohort(cohort):
    ids, files, embs, rng = cohort
    text = unit(rng, (2, 16)).astype(np.float32)
    table = text_to_tiles(["q one", "q two"], text, ids, files, 10, weights_sha256=WEIGHTS)
    assert list(table.columns) == ["query", "rank", "slide_id", "x", "y", "score"]
    for q, (score, slide, row) in enumerate(brute_force([e @ text.T for e in embs], 10)):
        got = table[table["query"] == ["q one", "q two"][q]]
        assert got["rank"].tolist() == list(range(1, 11))
        assert got["slide_id"].tolist() == [ids[s] for s in slide]
        assert got["x"].tolist() == (row * 224).tolist()
        assert got["y"].tolist() == (slide * 1000).tolist()
        np.testing.assert_allclose(got["score"], score, rtol=1e-6)
    # N beyond the cohort: every tile once
    assert len(text_to_tiles(["q"], text[:1], ids, files, 1000)) == 125


def test_text_to_tiles_refuses_embeddings_of_other_weights(cohort):
    ids, files, _, rng = cohort
    with pytest.raises(InputError, match="re-run the embedding step"):
        text_to_tiles(["q"], unit(rng, (1, 16)), ids, files, 5, weights_sha256="cd" * 32)


def test_slide_vectors_skip_slides_without_tiles(cohort):
    ids, files, embs, _ = cohort
    vectors = SlideVectors.from_embedding_files(ids, files)
    assert vectors.slide_ids == ["s0", "s2", "s3"] and vectors.skipped == ["s1"]
    mean = embs[2].mean(axis=0)  # the mean of (unit) tile embeddings, renormalised
    np.testing.assert_allclose(vectors.vectors[1], mean / np.linalg.norm(mean), rtol=1e-3)
    # the aggregation step's slide table gives the same vectors
    aggregate_slides(ids, ids, files, files[0].parent / "slides.parquet")
    from_table = SlideVectors.from_slide_table(files[0].parent / "slides.parquet", ["s3", "s1", "s0"])
    assert from_table.slide_ids == ["s3", "s0"] and from_table.skipped == ["s1"]
    np.testing.assert_allclose(from_table.vectors, vectors.vectors[[2, 0]], rtol=1e-6)
    write_embeddings(files[1], [], [], np.zeros((0, 16)), weights="cd" * 32)
    with pytest.raises(InputError, match="different models"):
        SlideVectors.from_embedding_files(ids, files)
    with pytest.raises(InputError, match="not in the slide table"):
        SlideVectors.from_slide_table(files[0].parent / "slides.parquet", ["s9"])


def test_slide_neighbours_match_scikit_learn_cosine_and_exclude_the_patient():
    rng = np.random.default_rng(1)
    vectors = unit(rng, (9, 6)).astype(np.float32)
    ids = [f"s{i}" for i in range(9)]
    patients = ["p0", "p0", "p1", "p2", "p3", "p3", "p3", "p4", "p5"]
    reference = cosine_similarity(vectors)
    table = slide_neighbours(ids, vectors, 3, patient_ids=patients, block=4)
    for i, sid in enumerate(ids):
        allowed = [j for j in range(9) if patients[j] != patients[i]]
        expected = sorted(allowed, key=lambda j: -reference[i, j])[:3]
        got = table[table["slide_id"] == sid].sort_values("rank")
        assert got["neighbour_id"].tolist() == [ids[j] for j in expected]
        np.testing.assert_allclose(got["cosine"], reference[i, expected], rtol=1e-5)
    # without patients only the slide itself is excluded; k beyond the cohort gives every other slide
    table = slide_neighbours(ids, vectors, 50)
    assert (table.groupby("slide_id").size() == 8).all()
    assert not (table["slide_id"] == table["neighbour_id"]).any()


def test_precision_at_k_on_a_hand_checked_example():
    neighbours = pd.DataFrame(
        [
            ("a1", 1, "a2", 0.9), ("a1", 2, "b1", 0.5),
            ("a2", 1, "a1", 0.9), ("a2", 2, "u", 0.4),
            ("b1", 1, "a1", 0.5), ("b1", 2, "a2", 0.3),
            ("u", 1, "a2", 0.4), ("u", 2, "a1", 0.2),
        ],
        columns=["slide_id", "rank", "neighbour_id", "cosine"],
    )  # fmt: skip
    labels = {"a1": "A", "a2": "A", "b1": "B", "u": None}
    summary = precision_at_k(neighbours, labels, [1, 2])
    assert summary["n_queries"] == 3  # u has no label
    assert summary["precision_at_k"] == {"1": pytest.approx(2 / 3), "2": pytest.approx((0.5 + 0.5 + 0) / 3)}
    # chance: a1 -> 1 of 3 others is A; a2 the same; b1 -> 0 of 3 others is B
    assert summary["chance"]["2"] == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    assert summary["per_label"] == {"A": {"1": 1.0, "2": 0.5}, "B": {"1": 0.0, "2": 0.0}}
    only = precision_at_k(neighbours, labels, [1], queries=["b1"])
    assert only["n_queries"] == 1 and only["precision_at_k"]["1"] == 0.0


def test_query_slugs_name_files_and_refuse_collisions():
    assert query_slugs(["Tumour necrosis", "a lymphocytic infiltrate"]) == [
        "tumour-necrosis",
        "a-lymphocytic-infiltrate",
    ]
    with pytest.raises(InputError, match="both name the gallery file"):
        query_slugs(["tumour necrosis", "Tumour  necrosis!"])
    with pytest.raises(InputError, match="no letters or digits"):
        query_slugs(["--"])


def test_retrieved_tiles_and_gallery_read_the_right_tiles_from_their_slides(tmp_path):
    rng = np.random.default_rng(2)
    paths, tile_files, sources = {}, {}, {}
    for sid in ("s", "t"):
        # flat 32-px colour blocks: JPEG keeps them nearly exact, so a tile is recognisable by its pixels
        rgb = np.full((512, 512, 3), 240, np.uint8)
        blocks = rng.integers(40, 220, (12, 12, 3), dtype=np.uint8) // np.array([1, 2, 1], np.uint8)
        rgb[64:448, 64:448] = np.repeat(np.repeat(blocks, 32, axis=0), 32, axis=1)
        paths[sid], tile_files[sid], sources[sid] = tmp_path / f"{sid}.tiff", tmp_path / f"{sid}.parquet", rgb
        write_pyramid_tiff(paths[sid], rgb, mpp=0.5, quality=95)
        run_tiling(
            paths[sid],
            sid,
            tile_files[sid],
            tmp_path / f"{sid}.png",
            params=TilingParams.from_config(default_config({"tiling": {"tile_px": 64}})),
        )
    xs = {sid: pq.read_table(tile_files[sid]).column("x").to_numpy() for sid in paths}
    ys = {sid: pq.read_table(tile_files[sid]).column("y").to_numpy() for sid in paths}

    def at(sid, x, y):  # the row of the tile at (x, y): tiles well inside the coloured area
        return int(np.flatnonzero((xs[sid] == x) & (ys[sid] == y))[0])

    picks = [("t", at("t", 128, 192)), ("s", at("s", 64, 64)), ("t", at("t", 320, 256))]
    table = pd.DataFrame(
        {
            "query": "q",
            "rank": [1, 2, 3],
            "slide_id": [s for s, _ in picks],
            "x": [xs[s][i] for s, i in picks],
            "y": [ys[s][i] for s, i in picks],
            "score": [0.9, 0.8, 0.7],
        }
    )
    images = retrieved_tiles(table, paths, tile_files)
    for image, (sid, i) in zip(images, picks, strict=True):
        x, y = xs[sid][i], ys[sid][i]
        expected = sources[sid][y : y + 64, x : x + 64].astype(float)
        assert np.abs(image - expected).mean() < 3
        other = sources["s" if sid == "t" else "t"][y : y + 64, x : x + 64].astype(float)
        assert np.abs(image - other).mean() > 10  # the other slide's tile at the same place would be caught
    data = query_gallery(
        table, "q", paths, tile_files, tmp_path / "g" / "q",
        style=FigureStyle.from_config(default_config({"figures": {"dpi": 50, "formats": ["png"]}})),
        truth=["necrosis", "fat", "fat"],
    )  # fmt: skip
    assert data["truth"].tolist() == ["necrosis", "fat", "fat"]
    assert (tmp_path / "g" / "q.png").exists()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "g" / "q.tsv", sep="\t"), data, check_dtype=False)
