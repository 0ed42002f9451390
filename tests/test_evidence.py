"""Zero-shot evidence: heatmap placement of tile scores, top tiles, and tiles read back from a real pyramid TIFF."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.colors import Normalize
from PIL import Image

from histoclip import store
from histoclip.config import default_config
from histoclip.demo import write_pyramid_tiff
from histoclip.errors import InputError
from histoclip.plots import FigureStyle
from histoclip.tiling import slide as wsi
from histoclip.tiling.grid import TilingParams, run_tiling
from histoclip.zeroshot.evidence import (
    CMAP,
    EvidenceOptions,
    TileLayout,
    heatmap_overlay,
    read_tiles,
    score_grid,
    select_slides,
    slide_evidence,
    top_tiles,
)

BLOCK = 32  # flat colour blocks: JPEG keeps them nearly exact, and every block is distinguishable


def blocky_rgb(size: int, seed: int) -> np.ndarray:
    """Saturated flat-colour 32-px blocks on white glass: tissue for the detector, and a known pixel truth."""
    rng = np.random.default_rng(seed)
    n = size // BLOCK
    colours = rng.integers(40, 220, (n, n, 3), dtype=np.uint8) // np.array([1, 2, 1], np.uint8)
    rgb = np.repeat(np.repeat(colours, BLOCK, axis=0), BLOCK, axis=1)
    margin = size // 6
    rgb[:margin], rgb[-margin:], rgb[:, :margin], rgb[:, -margin:] = 240, 240, 240, 240
    return np.ascontiguousarray(rgb)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """A 768 px slide at 0.5 µm/px with levels 1, 2, 4, tiled at 1.0 µm/px (64 px tiles = 128 level-0 px)."""
    tmp = tmp_path_factory.mktemp("evidence")
    rgb = blocky_rgb(768, seed=1)
    slide = tmp / "s.tiff"
    write_pyramid_tiff(slide, rgb, mpp=0.5, downsamples=(1, 2, 4), quality=95)
    meta = run_tiling(
        slide,
        "s",
        tmp / "s.parquet",
        tmp / "s.png",
        params=TilingParams.from_config(default_config({"tiling": {"target_mpp": 1.0, "tile_px": 64}})),
    )
    return tmp, rgb, slide, meta


def layout(width=1000, height=600, tile=100, stride=100) -> TileLayout:
    return TileLayout("s", width, height, tile, stride, 224, 0, tile)


def test_score_grid_puts_each_tile_score_in_its_cell():
    x = np.array([0, 300, 900, 200])
    y = np.array([0, 100, 500, 500])
    grid, extent = score_grid(x, y, np.array([0.1, 0.2, 0.3, 0.4]), layout())
    assert grid.shape == (6, 10)
    assert (grid[0, 0], grid[1, 3], grid[5, 9], grid[5, 2]) == pytest.approx((0.1, 0.2, 0.3, 0.4))
    assert np.isnan(grid).sum() == 60 - 4
    # imshow extent (left, right, bottom, top) in level-0 px: cell (row, col) spans [col, col+1) x stride
    assert extent == (0, 1000, 600, 0)


def test_heatmap_overlay_colours_each_tile_where_it_lies_on_the_thumbnail():
    thumbnail = np.full((60, 100, 3), 200, np.uint8)  # 1000 x 600 level-0 px at 1/10
    grid, extent = score_grid(np.array([300, 0]), np.array([100, 500]), np.array([1.0, 0.0]), layout())
    norm = Normalize(0.0, 1.0)
    out = heatmap_overlay(thumbnail, grid, extent, (1000, 600), norm, alpha=1.0)
    top = np.rint(np.array(CMAP(1.0)[:3]) * 255)
    bottom = np.rint(np.array(CMAP(0.0)[:3]) * 255)
    assert (out[10:20, 30:40] == top).all()  # the tile at x 300-400, y 100-200
    assert (out[50:60, 0:10] == bottom).all()  # the tile at x 0-100, y 500-600
    untouched = np.ones((60, 100), bool)
    untouched[10:20, 30:40] = untouched[50:60, 0:10] = False
    assert (out[untouched] == 200).all()
    half = heatmap_overlay(thumbnail, grid, extent, (1000, 600), norm, alpha=0.5)
    np.testing.assert_allclose(half[15, 35], (200 + top) / 2, atol=1)


def test_score_grid_with_overlap_centres_cells_on_their_tiles():
    # tiles 100 px with stride 50: cell of the tile at x=50 spans [75, 125) = its centre 100 ± 25
    grid, extent = score_grid(np.array([50]), np.array([0]), np.array([1.0]), layout(tile=100, stride=50))
    left, right, bottom, top = extent
    cell = (right - left) / grid.shape[1]
    col = int(np.flatnonzero(~np.isnan(grid[0]))[0])
    assert cell == 50
    assert left + col * cell + cell / 2 == 50 + 100 / 2


def test_score_grid_rejects_tiles_from_another_grid():
    with pytest.raises(InputError, match="not on the slide's tile grid"):
        score_grid(np.array([150]), np.array([0]), np.array([1.0]), layout())
    with pytest.raises(InputError, match="not on the slide's tile grid"):
        score_grid(np.array([1000]), np.array([0]), np.array([1.0]), layout())


def test_top_tiles_highest_first_ties_in_file_order_and_n_beyond_tiles():
    scores = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    assert top_tiles(scores, 3).tolist() == [1, 3, 2]
    assert top_tiles(scores, 10).tolist() == [1, 3, 2, 0, 4]
    assert top_tiles(scores, 0).tolist() == []


def test_layout_from_tile_file_and_failed_slide(tiled, tmp_path):
    tmp, _, _, meta = tiled
    got = TileLayout.from_tile_file(tmp / "s.parquet")
    assert (got.tile_level0_px, got.tile_px, got.read_level, got.read_tile_px) == (128, 64, 1, 64)
    assert (got.level0_width, got.level0_height) == (768, 768) and meta["n_tiles"] > 4
    failed = tmp_path / "f.parquet"
    store.write_table_atomic(failed, pa.table({"x": pa.array([], pa.int64())}), {"slide_id": "f", "status": "error"})
    with pytest.raises(InputError, match="lacks level0_width"):
        TileLayout.from_tile_file(failed)


def test_read_tiles_gives_the_slide_pixels_at_the_tile_resolution(tiled):
    tmp, rgb, slide_path, _ = tiled
    lay = TileLayout.from_tile_file(tmp / "s.parquet")
    tiles = pq.read_table(tmp / "s.parquet")
    x, y = tiles.column("x").to_numpy()[[0, -1]], tiles.column("y").to_numpy()[[0, -1]]
    with wsi.open_wsi(slide_path, "s") as slide:
        got = read_tiles(slide, lay, x, y)
        shifted = read_tiles(slide, lay, x + BLOCK, y)
    assert got.shape == (2, 64, 64, 3) and got.dtype == np.uint8
    for i in range(2):
        region = rgb[y[i] : y[i] + 128, x[i] : x[i] + 128].astype(np.float64)
        expected = region.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))  # 0.5 -> 1.0 µm/px, area average
        assert np.abs(got[i] - expected).mean() < 3.0
        assert np.abs(shifted[i] - expected).mean() > 10.0  # a wrong position would be caught


def write_scores(path, x, y, scores: dict[str, np.ndarray]) -> None:
    table = pa.table(
        {"x": pa.array(x, pa.int64()), "y": pa.array(y, pa.int64())}
        | {f"score_{c}": pa.array(v.astype(np.float32)) for c, v in scores.items()}
    )
    store.write_table_atomic(path, table, {"slide_id": "s", "classes": list(scores)})


def test_slide_evidence_shows_the_top_tiles_of_each_class(tiled, tmp_path):
    tmp, rgb, slide_path, _ = tiled
    tiles = pq.read_table(tmp / "s.parquet")
    x, y = tiles.column("x").to_numpy(), tiles.column("y").to_numpy()
    rng = np.random.default_rng(0)
    scores = {c: rng.uniform(0, 1, x.size) for c in ("adenocarcinoma", "squamous", "necrosis")}
    write_scores(tmp_path / "scores.parquet", x, y, scores)
    call = {"slide_id": "s", "call": "squamous", "best": "squamous", "p_squamous": 0.8, "margin": 0.6, "label": "x"}
    style = FigureStyle.from_config(default_config({"figures": {"dpi": 60, "formats": ["png"]}}))
    data = slide_evidence(
        slide_path,
        tmp / "s.parquet",
        tmp_path / "scores.parquet",
        tmp / "s.png",
        tmp_path / "ev" / "s",
        ["adenocarcinoma", "squamous"],
        call=call,
        top_k=3,
        options=EvidenceOptions.from_config(default_config({"figures": {"evidence": {"top_n": 3}}})),
        style=style,
    )
    written = pd.read_csv(tmp_path / "ev" / "s.tsv", sep="\t")
    pd.testing.assert_frame_equal(written, data, check_dtype=False)
    for c in ("adenocarcinoma", "squamous"):
        rows = written[written["class"] == c]
        best = np.argsort(-scores[c])[:3]
        assert rows["rank"].tolist() == [1, 2, 3]
        assert list(zip(rows["x"], rows["y"], strict=True)) == list(zip(x[best], y[best], strict=True))
        np.testing.assert_allclose(rows[f"score_{c}"], scores[c][best], rtol=1e-5)
        np.testing.assert_allclose(rows["score_necrosis"], scores["necrosis"][best], rtol=1e-5)
    with Image.open(tmp_path / "ev" / "s.png") as image:
        assert image.size[0] > image.size[1] > 100


def test_slide_evidence_for_a_slide_without_tiles_says_so(tmp_path):
    store.write_table_atomic(
        tmp_path / "t.parquet", pa.table({"x": pa.array([], pa.int64())}), {"slide_id": "f", "error": "unreadable"}
    )
    write_scores(tmp_path / "scores.parquet", np.zeros(0), np.zeros(0), {"a": np.zeros(0)})
    data = slide_evidence(
        tmp_path / "missing.tiff",
        tmp_path / "t.parquet",
        tmp_path / "scores.parquet",
        tmp_path / "missing.png",
        tmp_path / "f",
        ["a"],
        style=FigureStyle.from_config(default_config({"figures": {"dpi": 50, "formats": ["png"]}})),
    )
    assert data.empty and (tmp_path / "f.png").exists() and (tmp_path / "f.tsv").exists()


def test_slide_evidence_names_a_class_the_scores_lack(tiled, tmp_path):
    tmp, _, slide_path, _ = tiled
    write_scores(tmp_path / "scores.parquet", np.array([0]), np.array([0]), {"a": np.ones(1)})
    with pytest.raises(InputError, match="no score_b column"):
        slide_evidence(slide_path, tmp / "s.parquet", tmp_path / "scores.parquet", tmp / "s.png", tmp_path / "o", ["b"])


def calls_table(rows: list[tuple[str, str, str, float, bool, int]]) -> pd.DataFrame:
    """A calls table (slide_id, call, label, margin, abstain, n_tiles) of two called classes, a and b."""
    frame = pd.DataFrame(rows, columns=["slide_id", "call", "label", "margin", "abstain", "n_tiles"])
    frame["p_a"] = np.where(frame["call"] == "a", 0.5 + frame["margin"] / 2, 0.5 - frame["margin"] / 2)
    frame["p_b"] = 1 - frame["p_a"]
    return frame


def evidence_options(**changes) -> EvidenceOptions:
    return EvidenceOptions.from_config(default_config({"figures": {"evidence": changes}}))


SELECTION_CALLS = calls_table(
    [
        ("a1", "a", "a", 0.9, False, 40),
        ("a2", "a", "a", 0.5, False, 40),
        ("a3", "a", "a", 0.95, False, 40),
        ("b1", "b", "b", 0.8, False, 40),
        ("b2", "b", "", 0.99, False, 40),  # unlabelled: its call can't be wrong
        ("w1", "a", "b", 0.3, False, 40),  # misclassified
        ("w2", "b", "a", 0.7, False, 40),  # misclassified, more confidently
        ("q1", "", "a", 0.02, True, 40),  # abstained
        ("q2", "", "b", 0.01, True, 40),  # abstained, closer
        ("e1", "", "a", float("nan"), True, 0),  # no tiles: nothing to show
    ]
)


def test_evidence_selection_confident_per_class_then_errors_then_abstentions():
    picked = select_slides(SELECTION_CALLS, evidence_options(confident_per_class=2, max_slides=24))
    assert picked["slide_id"].tolist() == ["a3", "b2", "a1", "b1", "w2", "w1", "q2", "q1"]
    assert picked["reason"].tolist() == ["confident"] * 4 + ["misclassified"] * 2 + ["abstained"] * 2
    assert picked["drawn"].all()


def test_evidence_selection_cap_keeps_every_error_in_the_index():
    picked = select_slides(SELECTION_CALLS, evidence_options(confident_per_class=1, max_slides=3))
    assert picked["slide_id"].tolist() == ["a3", "b2", "w2", "w1", "q2", "q1"]
    assert picked["drawn"].tolist() == [True, True, True, False, False, False]


def test_evidence_selection_without_a_cap_draws_every_slide_with_tiles():
    picked = select_slides(SELECTION_CALLS, evidence_options(confident_per_class=0, max_slides=None))
    assert sorted(picked["slide_id"]) == sorted(set(SELECTION_CALLS["slide_id"]) - {"e1"})
    assert picked.set_index("slide_id")["reason"].to_dict()["a2"] == "slide" and picked["drawn"].all()
