"""Slide reading, the mpp policy, level choice and tile grids, on real slide files.

Real files come from ../shared/data (see its SOURCES.md); slides with specific metadata gaps are written
here with tifffile in formats OpenSlide really reads (generic tiled TIFF, Aperio SVS).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import openslide
import pytest
import tifffile

from histoclip.config import default_config
from histoclip.demo import write_pyramid_tiff
from histoclip.errors import SlideError
from histoclip.store import read_metadata
from histoclip.tiling import slide as wsi
from histoclip.tiling.grid import TilingParams, area_fractions, run_tiling, tile_grid, tile_slide

pytestmark = []


def write_aperio_like(path, *, resolution_mpp=None, app_mag=40, size=1024):
    """An Aperio SVS (OpenSlide vendor 'aperio') whose description has AppMag but no MPP."""
    rgb = np.full((size, size, 3), 240, np.uint8)
    rgb[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (170, 80, 160)
    kwargs = {}
    if resolution_mpp is not None:
        kwargs = {"resolution": (1e4 / resolution_mpp, 1e4 / resolution_mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            rgb,
            tile=(256, 256),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=f"Aperio Image Library v12.0.0\r\n{size}x{size} (256x256) JPEG/RGB Q=70|AppMag = {app_mag}",
            **kwargs,
        )
    return path


def h_and_e_square(size=2048):
    rgb = np.full((size, size, 3), 242, np.uint8)
    rgb[size // 4 : 3 * size // 4, size // 8 : 7 * size // 8] = (200, 110, 180)
    return rgb


# --- the mpp policy ---------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_cmu_small_region_aperio(shared_data, tmp_path):
    path = shared_data / "svs" / "CMU-1-Small-Region.svs"
    tiling = tile_slide(path, "CMU-1-Small-Region")
    assert tiling.vendor == "aperio"
    assert tiling.mpp == pytest.approx(0.499) and tiling.mpp_source == "openslide-metadata"
    width, height = 2220, 2967
    assert (tiling.level0_width, tiling.level0_height) == (width, height)
    assert tiling.grid.tile_level0_px == 224  # 224 px at 0.5 µm/px = 224.4 level-0 px at 0.499
    # The small region is mostly tissue: 2220 × 2967 px at 0.499 µm/px = 1.64 mm².
    assert 0.5 < tiling.tissue_area_mm2 < 1.64
    tile_mm2 = (224 * 0.499 / 1000) ** 2
    expected = tiling.tissue_area_mm2 / tile_mm2
    assert 0.6 * expected <= len(tiling.grid) <= min(1.2 * expected, 9 * 13)
    assert (tiling.grid.x >= 0).all() and (tiling.grid.x + 224 <= width).all()
    assert (tiling.grid.y >= 0).all() and (tiling.grid.y + 224 <= height).all()
    assert (tiling.grid.tissue >= 0.5).all() and (tiling.grid.tissue <= 1).all()
    # contract metadata in the file
    meta = run_tiling(path, "CMU-1-Small-Region", tmp_path / "t.parquet", tmp_path / "q.png")
    stored = read_metadata(tmp_path / "t.parquet")
    assert stored["level0_mpp"] == pytest.approx(0.499) and stored["mpp_source"] == "openslide-metadata"
    assert stored["n_tiles"] == meta["n_tiles"] == len(tiling.grid)
    assert stored["tile_px"] == 224 and stored["tile_level0_px"] == 224 and stored["read_level"] == 0
    assert "histoclip.provenance" in stored


@pytest.mark.shared_data
def test_openslide_fixtures_small_svs_and_dicom(shared_data):
    with pytest.raises(SlideError, match="is smaller than one tile: level 0 is 16×16 px at 0.499 µm/px"):
        tile_slide(shared_data / "synthetic" / "openslide-python-small.svs", "small")  # a 224-px tile: 224² px
    small = tile_slide(
        shared_data / "synthetic" / "openslide-python-small.svs",
        "small",
        params=replace(TilingParams.from_config(default_config()), tile_px=4, min_tissue_fraction=0.0),
    )
    assert small.vendor == "aperio" and small.mpp == pytest.approx(0.499)
    assert len(small.grid) == 16  # 4-px tiles fit
    dicom = tile_slide(
        shared_data / "synthetic" / "openslide-python-boxes-dicom" / "openslide-python-boxes_0.dcm",
        "boxes-dicom",
        params=replace(TilingParams.from_config(default_config()), tile_px=4, min_tissue_fraction=0.0),
    )
    assert dicom.vendor == "dicom" and dicom.mpp == pytest.approx(0.499)
    assert len(dicom.grid) == 16  # a 16 × 16 slide, 4-px tiles at ~0.5 µm/px, nothing filtered


@pytest.mark.shared_data
def test_boxes_tiff_72dpi_mpp_is_ignored_then_sheet_mpp_works(shared_data):
    path = shared_data / "synthetic" / "openslide-python-boxes.tiff"
    with pytest.raises(SlideError) as err:
        tile_slide(path, "boxes")
    message = str(err.value)
    assert "'boxes'" in message and "352.8" in message and "add an 'mpp' column" in message
    tiling = tile_slide(
        path,
        "boxes",
        sheet_mpp=0.25,
        params=TilingParams.from_config(default_config({"tiling": {"target_mpp": 1.0, "tile_px": 16}})),
    )
    assert tiling.mpp == 0.25 and tiling.mpp_source == "sheet"
    # level 2 has downsample 4.016 → 1.004 µm/px: within tolerance of the 1.0 target, so it is read
    assert tiling.read_level == 2
    assert tiling.grid.tile_level0_px == 64


def test_mpp_from_tiff_resolution_tags_when_vendor_metadata_lacks_it(tmp_path):
    path = write_aperio_like(tmp_path / "tags.svs", resolution_mpp=0.25)
    with wsi.open_wsi(path, "tags") as slide:
        assert slide.name == "openslide" and slide.vendor == "aperio"
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties
        resolved = wsi.resolve_mpp(slide, path, "tags")
    assert resolved.mpp == pytest.approx(0.25) and resolved.source == "tiff-resolution"


def test_mpp_estimated_from_objective_power_with_warning(tmp_path):
    path = write_aperio_like(tmp_path / "mag.svs", app_mag=40)
    tiling = tile_slide(path, "mag")
    assert tiling.mpp == pytest.approx(0.25) and tiling.mpp_source == "objective-power-estimate"
    assert any("objective power" in w and "add an 'mpp' column" in w for w in tiling.warnings)


def test_slide_without_mpp_anywhere_fails_clearly_then_works_with_sheet_mpp(tmp_path):
    path = tmp_path / "nompp.tiff"
    write_pyramid_tiff(path, h_and_e_square(), mpp=None)
    with openslide.OpenSlide(path) as slide:
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties
    with pytest.raises(SlideError) as err:
        tile_slide(path, "nompp")
    assert "slide 'nompp'" in str(err.value) and "mpp" in str(err.value) and "cohort sheet" in str(err.value)
    tiling = tile_slide(path, "nompp", sheet_mpp=0.5)
    assert tiling.mpp_source == "sheet" and len(tiling.grid) > 0


def test_absurd_sheet_mpp_is_an_error(tmp_path):
    path = tmp_path / "s.tiff"
    write_pyramid_tiff(path, h_and_e_square(512), mpp=0.5)
    with pytest.raises(SlideError, match="plausible range"):
        tile_slide(path, "s", sheet_mpp=500.0)


# --- level choice: never read more pixels than the target needs -------------------------------------------


def test_40x_slide_is_read_from_the_level_matching_the_target(tmp_path):
    path = tmp_path / "forty.tiff"
    write_pyramid_tiff(path, h_and_e_square(4096), mpp=0.25, downsamples=(1, 2, 8, 32))
    tiling = tile_slide(path, "forty")  # target 0.5 µm/px
    assert tiling.read_level == 1 and tiling.read_level_mpp == pytest.approx(0.5)
    assert tiling.grid.tile_level0_px == 448 and tiling.read_tile_px == 224
    assert tiling.tissue_level != 0  # tissue detection on a low-resolution level
    coarse = tile_slide(
        path, "forty", params=TilingParams.from_config(default_config({"tiling": {"target_mpp": 3.0, "tile_px": 32}}))
    )
    assert coarse.read_level == 2  # 2 µm/px: the coarsest level not coarser than 3 µm/px


def test_target_finer_than_scan_warns(tmp_path):
    path = tmp_path / "ten.tiff"
    write_pyramid_tiff(path, h_and_e_square(1024), mpp=1.0)
    tiling = tile_slide(
        path, "ten", params=TilingParams.from_config(default_config({"tiling": {"target_mpp": 0.5, "tile_px": 64}}))
    )
    assert tiling.read_level == 0 and any("finer than level 0" in w for w in tiling.warnings)


# --- the grid -----------------------------------------------------------------------------------------------


def test_area_fractions_are_exact_for_fractional_rectangles():
    mask = np.zeros((4, 4), np.float32)
    mask[1:3, 1:3] = 1
    x0 = np.array([0.0, 1.0, 0.5, 2.5, 3.0])
    y0 = np.array([0.0, 1.0, 0.5, 2.5, 3.0])
    x1 = x0 + np.array([4.0, 2.0, 1.0, 1.0, 1.0])
    y1 = y0 + np.array([4.0, 2.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(area_fractions(mask, x0, y0, x1, y1), [0.25, 1.0, 0.25, 0.25, 0.0], atol=1e-9)


def test_grid_geometry_overlap_and_tissue_threshold():
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True  # left half is tissue
    params = TilingParams.from_config(
        default_config({"tiling": {"target_mpp": 0.5, "tile_px": 100, "overlap_px": 50, "min_tissue_fraction": 0.5}})
    )
    grid = tile_grid(mask, (1000, 1000), mpp=0.5, params=params)  # mask is 10x coarser than level 0
    assert grid.tile_level0_px == 100 and grid.stride_level0_px == 50
    # x positions 0, 50, …, 450 have ≥ 50 % tissue (450 → exactly 50 %); 19 rows of y
    assert sorted(set(grid.x.tolist())) == list(range(0, 451, 50))
    assert len(grid) == 10 * 19
    assert grid.tissue[grid.x == 450] == pytest.approx(0.5)
    assert (grid.tissue[grid.x < 450] == 1.0).all()


# --- bad slides -----------------------------------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("broken/openslide-python-unopenable.tiff", "Unsupported TIFF compression"),
        ("broken/openslide-python-unreadable.svs", "Bogus marker length"),
        ("tiff/pathml-smalltif.tif", "this workflow reads brightfield RGB slides; found 1 channel of uint16"),
    ],
)
def test_broken_slides_fail_or_are_recorded(shared_data, tmp_path, name, cause):
    path = shared_data / name
    with pytest.raises(SlideError) as err:
        run_tiling(path, "bad-1", tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="fail")
    assert "slide 'bad-1'" in str(err.value) and cause in str(err.value)
    assert not (tmp_path / "t.parquet").exists()
    meta = run_tiling(path, "bad-1", tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="record")
    assert meta["status"] == "error" and cause in meta["error"]
    stored = read_metadata(tmp_path / "t.parquet")
    assert stored["status"] == "error" and cause in stored["error"] and stored["n_tiles"] == 0
    assert (tmp_path / "q.png").stat().st_size > 0
