"""Regions of interest in: a sheet's `roi` column naming a GeoJSON file (as QuPath exports annotations) restricts
tiling to tissue inside its polygons, holes respected, optionally only some classes.

The slide is bad_slides.good_slide: 1024 px at 0.5 µm/px, tissue in rows 256–768 and columns 128–896. Tiles are
64 level-0 px (64 px at 0.5 µm/px) and every region boundary is on that grid (and on the 16-px grid of the tissue
mask at 8 µm/px), so each tile is wholly inside or outside a region and the expected tiles are exact.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from bad_slides import copy_workflow, good_slide, snakemake, write_sheet

from histoclip.config import default_config
from histoclip.errors import InputError, SlideError
from histoclip.formats import read_tile_file, read_tile_metadata
from histoclip.preflight.slides import SlideSettings, check_slide
from histoclip.sheets import read_cohort_sheet
from histoclip.tiling.grid import TilingParams, run_tiling, tile_slide
from histoclip.tiling.roi import read_roi, roi_mask

TILE = 64
PARAMS = replace(TilingParams.from_config(default_config()), tile_px=TILE)


def square(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def annotation(rings: list, name: str | None = None, object_type: str = "annotation") -> dict:
    properties: dict = {"objectType": object_type}
    if name:
        properties["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings}, "properties": properties}


TUMOUR = annotation([square(128, 256, 640, 768), square(320, 448, 448, 576)], "Tumor")  # with a hole
STROMA = annotation([square(704, 256, 896, 512)], "Stroma")


def write_geojson(path: Path, features: list[dict]) -> Path:
    """A FeatureCollection, as QuPath 0.4+ writes with File > Export objects as GeoJSON."""
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def tiles_inside(x: np.ndarray, y: np.ndarray, boxes: list[tuple[int, int, int, int]], holes=()) -> np.ndarray:
    """Which tiles (top-left x, y) lie wholly inside one of ``boxes`` and touch none of ``holes``."""
    inside = np.zeros(len(x), bool)
    for x0, y0, x1, y1 in boxes:
        inside |= (x >= x0) & (y >= y0) & (x + TILE <= x1) & (y + TILE <= y1)
    for x0, y0, x1, y1 in holes:
        inside &= ~((x < x1) & (x + TILE > x0) & (y < y1) & (y + TILE > y0))
    return inside


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return good_slide(tmp_path_factory.mktemp("roi") / "slide.tiff")


@pytest.fixture(scope="module")
def all_tiles(slide):
    grid = tile_slide(slide, "s", params=PARAMS).grid
    return grid.x, grid.y


def test_the_mask_of_a_polygon_with_a_hole_is_exact_on_the_mask_grid(tmp_path):
    roi = read_roi(write_geojson(tmp_path / "r.geojson", [TUMOUR]))
    mask = roi_mask(roi, (64, 64), (1024, 1024))  # 16 level-0 px per mask pixel
    expected = np.zeros((64, 64), bool)
    expected[16:48, 8:40] = True
    expected[28:36, 20:28] = False
    np.testing.assert_array_equal(mask, expected)


def test_tiling_keeps_only_tissue_inside_the_regions_holes_respected(slide, all_tiles, tmp_path):
    x, y = all_tiles
    assert len(x) == 8 * 12  # the whole tissue block, as a check of the fixture
    roi = read_roi(write_geojson(tmp_path / "r.geojson", [TUMOUR, STROMA]))
    tiling = tile_slide(slide, "s", params=PARAMS, roi=roi)
    expected = tiles_inside(x, y, [(128, 256, 640, 768), (704, 256, 896, 512)], holes=[(320, 448, 448, 576)])
    assert sorted(zip(tiling.grid.x.tolist(), tiling.grid.y.tolist(), strict=True)) == sorted(
        zip(x[expected].tolist(), y[expected].tolist(), strict=True)
    )
    assert len(tiling.grid) == 8 * 8 - 2 * 2 + 3 * 4  # tumour square minus its hole, plus the stroma square
    regions_mm2 = (8 * 8 - 4 + 12) * (TILE * 0.5 / 1000) ** 2  # the tissue inside them: nearly all of it
    assert 0.99 * regions_mm2 <= tiling.tissue_area_mm2 <= regions_mm2


def test_classes_filter_the_regions(slide, all_tiles, tmp_path):
    x, y = all_tiles
    path = write_geojson(tmp_path / "r.geojson", [TUMOUR, STROMA])
    stroma = tile_slide(slide, "s", params=PARAMS, roi=read_roi(path, ["Stroma"])).grid
    assert len(stroma) == 12 and tiles_inside(stroma.x, stroma.y, [(704, 256, 896, 512)]).all()
    with pytest.raises(InputError, match=r"has no region of the classes \['Necrosis'\].*'Stroma', 'Tumor'"):
        read_roi(path, ["Necrosis"])


def test_qupath_exports_old_and_new_are_read_and_detections_are_not_regions(tmp_path):
    detection = annotation([square(0, 0, 64, 64)], "Tumor", object_type="detection")
    multi = {
        "type": "Feature",
        "geometry": {
            "type": "MultiPolygon",
            "coordinates": [[square(128, 256, 256, 384)], [square(704, 256, 832, 384)]],
        },
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
    }
    old = tmp_path / "old.geojson"
    old.write_text(json.dumps([detection, multi]))  # QuPath before 0.4: a JSON array of features
    roi = read_roi(old)
    assert len(roi.regions) == 2 and {r.classification for r in roi.regions} == {"Tumor"}
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"type": "Polygon", "coordinates": [square(0, 0, 10, 10)]}))
    assert len(read_roi(bare).regions) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not JSON"),
        (json.dumps({"type": "Topology"}), "is not GeoJSON regions"),
        (json.dumps([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}]), "Point geometry"),
        (json.dumps([annotation([[[0, 0], [1, 1]]])]), "at least 3 finite"),
        (json.dumps({"type": "FeatureCollection", "features": []}), "has no region"),
    ],
)
def test_bad_roi_files_are_named_with_the_feature(tmp_path, content, message):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as raised:
        read_roi(path)
    assert str(path) in str(raised.value)


def test_a_bad_roi_file_is_the_slides_error_under_on_slide_error(slide, tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0]]}}]))
    out = (tmp_path / "t.parquet", tmp_path / "t.png")
    with pytest.raises(SlideError, match=r"slide 's'.*bad.geojson', feature 0: has a LineString geometry"):
        run_tiling(slide, "s", *out, on_slide_error="fail", roi_path=str(bad), params=PARAMS)
    meta = run_tiling(slide, "s", *out, on_slide_error="record", roi_path=str(bad), params=PARAMS)
    assert meta["status"] == "error" and "LineString" in meta["error"]
    assert read_tile_metadata(out[0])["reader"] == "openslide"  # what was read before the failure is kept


def test_the_tile_file_records_the_regions(slide, tmp_path):
    path = write_geojson(tmp_path / "r.geojson", [TUMOUR, STROMA])
    out = (tmp_path / "t.parquet", tmp_path / "t.png")
    meta = run_tiling(slide, "s", *out, roi_path=str(path), roi_classes=("Tumor",), params=PARAMS)
    stored = read_tile_metadata(out[0])
    assert stored["roi"] == str(path) and stored["roi_classes"] == ["Tumor"] and stored["roi_regions"] == 1
    assert len(stored["roi_sha256"]) == 64 and meta["n_tiles"] == 60


def test_sheet_and_preflight_check_the_roi_file(slide, tmp_path):
    header = ("slide_id", "patient_id", "path", "roi")
    missing = write_sheet(tmp_path / "missing.tsv", [["s", "P1", slide, "nowhere.geojson"]], header)
    with pytest.raises(InputError, match=r"line 2, column 'roi'.*ROI file .*nowhere.geojson' for 's' does not exist"):
        read_cohort_sheet(missing)
    far = write_geojson(tmp_path / "far.geojson", [annotation([square(5000, 5000, 6000, 6000)])])
    edge = write_geojson(tmp_path / "edge.geojson", [annotation([square(900, 256, 1100, 512)])])
    sheet = write_sheet(tmp_path / "s.tsv", [["far", "P1", slide, far.name], ["edge", "P2", slide, edge.name]], header)
    records = read_cohort_sheet(sheet)
    assert records[0].roi == far and "roi" not in records[0].extra
    settings = SlideSettings.from_config(default_config({"tiling": {"tile_px": TILE}}))
    outside, partly = (check_slide(record, settings) for record in records)
    assert outside.status == "error" and "lie outside the slide (1024×1024 px)" in outside.problems[0].problem
    assert partly.status == "ok" and [p.severity for p in partly.problems] == ["warning"]
    assert "only the part inside is tiled" in partly.problems[0].problem


@pytest.mark.integration
def test_the_workflow_tiles_each_slide_inside_its_own_regions(slide, tmp_path):
    """Through Snakemake: the sheet's roi column reaches the tile job, and editing the file re-tiles the slide."""
    workdir = copy_workflow(tmp_path / "wf")
    tumour = write_geojson(tmp_path / "tumour.geojson", [TUMOUR, STROMA])
    header = ("slide_id", "patient_id", "path", "roi")
    sheet = write_sheet(tmp_path / "s.tsv", [["a", "P1", slide, tumour.name], ["b", "P2", slide, ""]], header)
    (workdir / "small.yaml").write_text(f"tiling: {{tile_px: {TILE}, roi_classes: [Tumor]}}\n")
    args = ["results/qc/cohort.tsv", "--configfile", "small.yaml", "--config", f"slides={sheet}", "clinical="]
    snakemake(workdir, *args)
    (a, _, meta_a), (b, _, meta_b) = (read_tile_file(workdir / f"results/tiles/{s}.parquet") for s in "ab")
    assert (len(a), len(b)) == (60, 96) and meta_a["roi_classes"] == ["Tumor"] and "roi" not in meta_b
    write_geojson(tumour, [STROMA, annotation([square(128, 256, 256, 384)], "Tumor")])
    snakemake(workdir, *args)
    assert len(read_tile_file(workdir / "results/tiles/a.parquet")[0]) == 4


def test_a_qupath_export_of_the_tissue_round_trips_through_tiling(tmp_path, shared_data):
    """The QuPath GeoJSON histoclip exports (tissue annotations + tile detections) read back as an ROI file: its
    detections are left out, its tissue annotations are the mask tiling measured the tiles on, so tiling the slide
    again inside them keeps the same tiles (a real Aperio slide; boundaries off the tile grid)."""
    from histoclip.export.qupath import slide_feature_collection, write_geojson
    from histoclip.export.tiles import SlideTiles
    from histoclip.formats import read_tissue_mask

    svs = shared_data / "svs" / "CMU-1-Small-Region.svs"
    out = {name: tmp_path / name for name in ("t.parquet", "t.png", "mask.png")}
    run_tiling(svs, "cmu1", out["t.parquet"], out["t.png"], mask_out=out["mask.png"], params=PARAMS)
    x, y, meta = read_tile_file(out["t.parquet"])
    tiles = SlideTiles("cmu1", x, y, np.ones(len(x), np.float32), meta)
    exported = tmp_path / "cmu1.geojson"
    write_geojson(exported, slide_feature_collection(tiles, read_tissue_mask(out["mask.png"])))
    roi = read_roi(exported)
    assert {r.classification for r in roi.regions} == {"Tissue"} and len(x) > 100
    again = tile_slide(svs, "cmu1", params=PARAMS, roi=roi)
    assert set(zip(again.grid.x.tolist(), again.grid.y.tolist(), strict=True)) == set(
        zip(x.tolist(), y.tolist(), strict=True)
    )
