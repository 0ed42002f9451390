"""histoclip.formats: importable without torch or matplotlib, and what it writes reads back the same."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from histoclip import formats
from histoclip.errors import InputError


def test_importing_formats_loads_neither_torch_nor_matplotlib():
    code = (
        "import sys, histoclip.formats\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib'))\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_tile_file_round_trip_and_failed_slide(tmp_path):
    x, y, tissue = np.array([0, 224]), np.array([448, 448]), np.array([0.5, 1.0])
    formats.write_tile_file(tmp_path / "a.parquet", {"slide_id": "a", "read_level": 1}, x, y, tissue)
    rx, ry, meta = formats.read_tile_file(tmp_path / "a.parquet")
    assert rx.tolist() == [0, 224] and ry.tolist() == [448, 448]
    assert meta["slide_id"] == "a" and formats.read_tile_metadata(tmp_path / "a.parquet")["read_level"] == 1
    formats.write_tile_file(tmp_path / "b.parquet", {"slide_id": "b", "status": "error"})
    bx, _, meta = formats.read_tile_file(tmp_path / "b.parquet")
    assert len(bx) == 0 and meta["status"] == "error"


def test_cohort_table_keeps_ids_as_text_and_empty_fields_empty(tmp_path):
    table = pd.DataFrame({"slide_id": ["001", "002"], "patient_id": ["007", "008"], "status": ["ok", "error"]})
    table["level0_mpp"] = [0.25, ""]
    formats.write_cohort_table(table, tmp_path / "cohort.tsv")
    back = formats.read_cohort_table(tmp_path / "cohort.tsv")
    assert back["slide_id"].tolist() == ["001", "002"] and back["patient_id"].tolist() == ["007", "008"]
    assert back["level0_mpp"].tolist() == ["0.25", ""]


def test_embedding_file_streams_in_row_groups_and_reads_back(tmp_path):
    path = tmp_path / "e.parquet"
    x, y = np.arange(5) * 224, np.zeros(5, np.int64)
    values = np.eye(5, 4, dtype=np.float32)
    writer = formats.EmbeddingFileWriter(path, x, y, 4, "float16", {"slide_id": "s", "dim": 4}, row_group_rows=2)
    writer.add(values[:3])
    writer.add(values[3:])
    writer.commit("slide 's'")
    rx, ry, embeddings, meta = formats.read_tile_embeddings(path)
    assert rx.tolist() == x.tolist() and ry.tolist() == y.tolist() and meta["slide_id"] == "s"
    np.testing.assert_array_equal(embeddings, values)
    footer = formats.read_embedding_footer(path)
    assert (footer.n_rows, footer.dim, footer.weights_sha256) == (5, 4, None)
    assert not list(tmp_path.glob(".*.tmp"))


def test_embedding_writer_refuses_a_short_slide_and_leaves_nothing(tmp_path):
    path = tmp_path / "e.parquet"
    writer = formats.EmbeddingFileWriter(path, np.arange(3), np.arange(3), 4, "float32", {}, row_group_rows=8)
    writer.add(np.ones((2, 4), np.float32))
    with pytest.raises(RuntimeError, match="slide 's': wrote 2 of 3 tiles"):
        writer.commit("slide 's'")
    assert not path.exists() and not list(tmp_path.iterdir())


def test_failed_embedding_file_is_empty_with_its_cause(tmp_path):
    formats.write_failed_embedding_file(tmp_path / "f.parquet", 8, "float16", {"status": "error", "error": "boom"})
    x, _, embeddings, meta = formats.read_tile_embeddings(tmp_path / "f.parquet")
    assert len(x) == 0 and embeddings.shape == (0, 8) and meta["error"] == "boom"


def test_text_classifier_round_trip(tmp_path):
    weights = np.arange(6, dtype=np.float64).reshape(3, 2) / 10
    classifier = formats.TextClassifier(["a", "b", "bg"], [True, True, False], weights, 100.0, {"prompt_set": "p"})
    formats.write_text_classifier(tmp_path / "c.parquet", classifier, [2, 3, 1])
    back = formats.read_text_classifier(tmp_path / "c.parquet")
    assert back.classes == ["a", "b", "bg"] and back.called_classes == ["a", "b"] and back.logit_scale == 100.0
    np.testing.assert_allclose(back.weights, weights, rtol=1e-6)
    assert back.metadata["prompt_set"] == "p"


def test_tile_scores_round_trip_and_refuse_another_file(tmp_path):
    scores = np.array([[0.1, 0.2], [0.3, 0.4]])
    formats.write_tile_scores(tmp_path / "s.parquet", np.array([0, 1]), np.array([2, 3]), scores, ["a", "b"], {})
    x, y, by_class = formats.read_tile_scores(tmp_path / "s.parquet")
    assert x.tolist() == [0, 1] and y.tolist() == [2, 3] and list(by_class) == ["a", "b"]
    np.testing.assert_allclose(by_class["b"], [0.2, 0.4], rtol=1e-6)
    formats.write_tile_file(tmp_path / "t.parquet", {}, np.array([0]), np.array([0]), np.array([1.0]))
    with pytest.raises(InputError, match="not a tile-score file"):
        formats.read_tile_scores(tmp_path / "t.parquet")


def test_calls_table_round_trip_keeps_text_as_text_and_numbers_as_numbers(tmp_path):
    calls = pd.DataFrame(
        {
            "slide_id": ["001", "002"],
            "call": ["a", ""],
            formats.probability_column("a"): [0.75, np.nan],
            formats.probability_column("b"): [0.25, np.nan],
            "margin": [0.5, np.nan],
            "abstain": [False, True],
            "best": ["a", ""],
            "n_tiles": [10, 0],
            "status": ["ok", "no tiles"],
            "label": ["a", ""],
        }
    )
    formats.write_calls(tmp_path / "calls.tsv", calls)
    back = formats.read_calls(tmp_path / "calls.tsv")
    assert formats.called_classes(back) == ["a", "b"]
    assert back["slide_id"].tolist() == ["001", "002"] and back["call"].tolist() == ["a", ""]
    assert back["label"].tolist() == ["a", ""] and back["abstain"].tolist() == [False, True]
    assert back["p_a"].tolist()[0] == 0.75 and np.isnan(back["p_a"].tolist()[1])
    assert back["n_tiles"].tolist() == [10, 0]


def test_slide_embeddings_round_trip_with_a_null_row(tmp_path):
    import pyarrow as pa

    vectors = [np.array([1, 0, 0], np.float32), None]
    table = pa.table(
        {
            "slide_id": pa.array(["a", "b"]),
            "patient_id": pa.array(["P", "Q"]),
            "n_tiles": pa.array([3, 0], pa.int64()),
            "embedding": formats.vectors_column(vectors, 3),
        }
    )
    formats.write_slide_embeddings(tmp_path / "slides.parquet", table, {"dim": 3})
    assert formats.slide_embedding_columns(tmp_path / "slides.parquet") == [
        "slide_id",
        "patient_id",
        "n_tiles",
        "embedding",
    ]
    frame, matrix = formats.read_slide_embeddings(tmp_path / "slides.parquet")
    assert frame["slide_id"].tolist() == ["a", "b"] and frame["n_tiles"].tolist() == [3, 0]
    np.testing.assert_array_equal(matrix[0], [1, 0, 0])
    assert np.isnan(matrix[1]).all()
    with pytest.raises(InputError, match="no column 'embedding_x'"):
        formats.read_slide_embeddings(tmp_path / "slides.parquet", "embedding_x")


def test_composition_round_trip_and_refuses_another_table(tmp_path):
    composition = pd.DataFrame(
        {"slide_id": ["001"], "patient_id": ["007"], "n_tiles": [4], "phenotype_00": [0.25], "phenotype_01": [0.75]}
    )
    formats.write_composition(tmp_path / "composition.tsv", composition)
    back = formats.read_composition(tmp_path / "composition.tsv")
    pd.testing.assert_frame_equal(back, composition)
    formats.write_composition(tmp_path / "other.tsv", composition[["slide_id", "n_tiles"]])
    with pytest.raises(InputError, match="not a phenotype composition table"):
        formats.read_composition(tmp_path / "other.tsv")


def test_slide_tsv_is_read_as_text_and_checked(tmp_path):
    (tmp_path / "t.tsv").write_text("slide_id\tx\n001\t1.50\n002\t\n", encoding="utf-8")
    table = formats.read_slide_tsv(tmp_path / "t.tsv", kind="calls", required=["slide_id", "x"])
    assert table.to_dict("list") == {"slide_id": ["001", "002"], "x": ["1.50", ""]}
    with pytest.raises(InputError, match="missing column"):
        formats.read_slide_tsv(tmp_path / "t.tsv", kind="calls", required=["slide_id", "y"])
    (tmp_path / "d.tsv").write_text("slide_id\n001\n001\n", encoding="utf-8")
    with pytest.raises(InputError, match="duplicate slide ids 001"):
        formats.read_slide_tsv(tmp_path / "d.tsv", kind="calls", required=["slide_id"])


def test_class_map_round_trip(tmp_path):
    label = np.zeros((8, 8), np.uint8)
    label[:, 4:] = 2
    formats.write_class_map(tmp_path / "m.png", label, 4, ["background", "a", "b"])
    back, downsample = formats.read_class_map(tmp_path / "m.png")
    np.testing.assert_array_equal(back, label)
    assert downsample == 4 and formats.read_class_map_classes(tmp_path / "m.png") == ["background", "a", "b"]
    assert formats.tile_classes(tmp_path / "m.png", [0, 16, 100], [0, 0, 0], 4).tolist() == [
        "background",
        "b",
        "background",
    ]
