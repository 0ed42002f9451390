"""Slide and patient embeddings: hand-computed values, empty slides, provenance, per-class top-K columns."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from histoclip import store
from histoclip.cohort.aggregation import (
    aggregate_slides,
    class_topk_embeddings,
    patient_embeddings,
    slide_embedding,
)
from histoclip.errors import InputError
from histoclip.formats import embedding_paths, read_slide_embeddings, write_embedding_manifest

SHA = "ab" * 32


def write_embeddings(path, embeddings, *, sha=SHA, dtype="float16", status="ok", x=None):
    """An embedding file as the embedding rule writes it (x, y, fixed-size-list embedding + provenance)."""
    embeddings = np.asarray(embeddings, dtype=np.float32).reshape(-1, 4) if len(embeddings) else np.zeros((0, 4))
    n, dim = embeddings.shape
    arrow_type = pa.float16() if dtype == "float16" else pa.float32()
    flat = pa.array(embeddings.astype(dtype).reshape(-1), arrow_type)
    x = np.arange(n) * 224 if x is None else np.asarray(x)
    table = pa.table(
        {
            "x": pa.array(x, pa.int64()),
            "y": pa.array(np.zeros(n, np.int64)),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )
    meta = {"model_name": "m", "weights_sha256": sha, "dim": dim, "status": status, "architecture": "ViT-test"}
    store.write_table_atomic(path, table, meta)
    return path


def write_scores(path, scores, classes, x=None):
    scores = np.asarray(scores, dtype=np.float32)
    x = np.arange(len(scores)) * 224 if x is None else np.asarray(x)
    columns = {"x": pa.array(x, pa.int64()), "y": pa.array(np.zeros(len(scores), np.int64))}
    columns |= {f"score_{c}": pa.array(scores[:, i]) for i, c in enumerate(classes)}
    store.write_table_atomic(path, pa.table(columns), {"classes": classes})
    return path


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_slide_embedding_is_the_renormalised_mean_of_unit_tiles():
    # Tile 2 has norm 2 (off-norm input): it is renormalised before averaging, so both tiles weigh the same.
    tiles = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    expected = np.array([1, 1, 0, 0]) / np.sqrt(2)
    result = slide_embedding(tiles)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, atol=1e-7)
    with pytest.raises(ValueError, match="no tiles"):
        slide_embedding(np.zeros((0, 4)))


def test_class_topk_embedding_takes_each_class_own_top_tiles():
    tiles = np.eye(4)
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.1, 0.9], [0.8, 0.2]])
    result = class_topk_embeddings(tiles, scores, k=2)
    # class 0: tiles 0 and then the tie 1/3 at 0.8 → the earlier tile (1) wins; class 1: tiles 2 and 1
    np.testing.assert_allclose(result[0], unit([1, 1, 0, 0]), atol=1e-7)
    np.testing.assert_allclose(result[1], unit([0, 1, 1, 0]), atol=1e-7)
    # K larger than the slide: all tiles, i.e. the slide embedding, for every class
    np.testing.assert_allclose(class_topk_embeddings(tiles, scores, k=50), [slide_embedding(tiles)] * 2, atol=1e-7)


def test_aggregate_slides_table_values_provenance_and_empty_slide(tmp_path, caplog):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 4))
    b = rng.normal(size=(3, 4))
    files = [
        write_embeddings(tmp_path / "a.parquet", a),
        write_embeddings(tmp_path / "b.parquet", b, dtype="float32"),
        write_embeddings(tmp_path / "c.parquet", [], status="error"),
    ]
    out = tmp_path / "slides" / "m.parquet"
    with caplog.at_level(logging.WARNING, logger="histoclip.cohort.aggregation"):
        aggregate_slides(["a", "b", "c"], ["P1", "P1", "P2"], files, out)
    assert "c (error)" in caplog.text
    table = pq.read_table(out)
    assert table.schema.names == ["slide_id", "patient_id", "n_tiles", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert table.column("n_tiles").to_pylist() == [5, 3, 0]
    assert table.column("embedding").to_pylist()[2] is None
    frame, matrix = read_slide_embeddings(out)
    # a was stored as float16: compare with the mean of the float16-rounded tiles, renormalised
    a16 = a.astype(np.float16).astype(np.float64)
    expected_a = unit((a16 / np.linalg.norm(a16, axis=1, keepdims=True)).mean(axis=0))
    np.testing.assert_allclose(matrix[0], expected_a, atol=1e-6)
    np.testing.assert_allclose(matrix[1], unit((b / np.linalg.norm(b, axis=1, keepdims=True)).mean(axis=0)), atol=1e-6)
    assert np.isnan(matrix[2]).all()
    assert frame["slide_id"].tolist() == ["a", "b", "c"]
    meta = store.read_metadata(out)
    assert meta["weights_sha256"] == SHA and meta["model_name"] == "m" and meta["dim"] == 4
    assert meta["n_empty_slides"] == 1 and store.PROVENANCE_KEY in meta


def test_slide_table_readable_by_pandas_polars_duckdb(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    files = [write_embeddings(tmp_path / "a.parquet", np.eye(4)), write_embeddings(tmp_path / "b.parquet", [])]
    out = tmp_path / "m.parquet"
    aggregate_slides(["a", "b"], ["P1", "P2"], files, out)
    assert pd.read_parquet(out)["n_tiles"].tolist() == [4, 0]
    assert pl.read_parquet(out)["embedding"].null_count() == 1
    ((count, dim),) = duckdb.sql(f"SELECT count(embedding), max(len(embedding)) FROM '{out}'").fetchall()
    assert (count, dim) == (1, 4)


def test_mixed_models_are_refused(tmp_path):
    files = [
        write_embeddings(tmp_path / "a.parquet", np.eye(4)),
        write_embeddings(tmp_path / "b.parquet", np.eye(4), sha="cd" * 32),
    ]
    with pytest.raises(InputError, match="re-run the embedding step"):
        aggregate_slides(["a", "b"], ["P1", "P2"], files)


def test_class_columns_from_tile_scores(tmp_path):
    rng = np.random.default_rng(1)
    tiles = rng.normal(size=(6, 4))
    scores = rng.normal(size=(6, 3))
    classes = ["tumour", "stroma", "fat"]
    emb = [
        write_embeddings(tmp_path / "a.parquet", tiles, dtype="float32"),
        write_embeddings(tmp_path / "b.parquet", []),
    ]
    sc = [
        write_scores(tmp_path / "a.scores.parquet", scores, classes),
        write_scores(tmp_path / "b.scores.parquet", np.zeros((0, 3)), classes),
    ]
    table = aggregate_slides(["a", "b"], ["P1", "P2"], emb, tile_score_files=sc, class_top_k=2)
    assert table.schema.names[4:] == [f"embedding_{c}" for c in classes]
    unit_tiles = tiles / np.linalg.norm(tiles, axis=1, keepdims=True)
    for c, cls in enumerate(classes):
        top2 = np.argsort(-scores[:, c])[:2]
        got = np.asarray(table.column(f"embedding_{cls}").to_pylist()[0])
        np.testing.assert_allclose(got, unit(unit_tiles[top2].mean(axis=0)), atol=1e-6)
        assert table.column(f"embedding_{cls}").to_pylist()[1] is None
    # tile scores of other tiles than the embeddings: refused, not silently misaligned
    bad = [write_scores(tmp_path / "c.scores.parquet", scores, classes, x=np.arange(6) + 1), sc[1]]
    with pytest.raises(InputError, match="same tiles"):
        aggregate_slides(["a", "b"], ["P1", "P2"], emb, tile_score_files=bad)


def test_patient_embedding_is_tile_weighted_and_skips_empty_slides():
    import pandas as pd

    e1, e2 = unit([1, 0, 0, 0]), unit([0, 1, 0, 0])
    slides = pd.DataFrame({"patient_id": ["P1", "P1", "P2", "P1"], "n_tiles": [1, 3, 0, 0]})
    embeddings = np.array([e1, e2, np.full(4, np.nan), np.full(4, np.nan)])
    frame, matrix = patient_embeddings(slides, embeddings)
    assert frame["patient_id"].tolist() == ["P1", "P2"]
    assert frame["n_slides"].tolist() == [3, 1] and frame["n_tiles"].tolist() == [4, 0]
    np.testing.assert_allclose(matrix[0], unit(1 * e1 + 3 * e2), atol=1e-7)
    assert np.isnan(matrix[1]).all()


def test_embedding_manifest_lists_the_files_in_sheet_order_and_refuses_a_stale_one(tmp_path):
    from histoclip.errors import InputError

    files = [f"results/embeddings/m/{s}.parquet" for s in ("b", "a", "c")]
    write_embedding_manifest(tmp_path / "m.tsv", ["b", "a", "c"], files)
    assert embedding_paths(tmp_path / "m.tsv", ["b", "a", "c"]) == files
    assert embedding_paths(tmp_path / "m.tsv") == files
    with pytest.raises(InputError, match="sheet's order"):
        embedding_paths(tmp_path / "m.tsv", ["a", "b", "c"])
    with pytest.raises(ValueError, match="3 slide ids but 2"):
        write_embedding_manifest(tmp_path / "x.tsv", ["b", "a", "c"], files[:2])
