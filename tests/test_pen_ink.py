"""Marker ink across real tissue: blue, green and black strokes drawn over CMU-1-Small-Region (real H&E skin, with
dense epidermis) and written as a pyramidal TIFF, so the ground-truth ink is known. Issue 14: green strokes were
removed but blue ones over tissue were kept (27 of 6,085 kept tiles at least 25 % blue ink).

Ink is drawn as a marker lays it: on the coverslip, over whatever is under it, so the tissue's colour is multiplied
by the ink's transmission (Beer-Lambert, densities added), with a soft out-of-focus rim. The transmissions are those
of real strokes on glass: the blue of wsi-blue-pen.png ((54, 109, 197) on glass of 238, its darkest 5 %), the green
of no-tissue-green-pen.png ((48, 160, 138)), and a black marker.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

from histoclip.config import default_config
from histoclip.demo import write_pyramid_tiff
from histoclip.tiling.grid import TileGrid, TilingParams, area_fractions, tile_slide
from histoclip.tiling.tissue import TissueParams, blue_ink_over_tissue_mask, pen_mask

INK_TRANSMISSION = {"blue": (0.23, 0.46, 0.83), "green": (0.20, 0.67, 0.58), "black": (0.12, 0.12, 0.14)}
STROKES = {"blue": 4, "green": 2, "black": 2}
STROKE_UM = 300.0  # a fine marker
RIM_UM = 40.0  # the out-of-focus rim (Gaussian sigma)
GT_STEP = 4  # the ground-truth coverage is kept at 1/4 of level 0


def cmu_mosaic(path: Path, reps: int = 3) -> tuple[np.ndarray, float]:
    """CMU-1-Small-Region mirrored into a reps × reps mosaic (3.3 × 4.4 mm): real tissue, enough tiles for a
    0.1 % criterion to mean something."""
    slide = openslide.OpenSlide(str(path))
    rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3]
    rows = [np.concatenate([rgb[:, ::-1] if j % 2 else rgb for j in range(reps)], axis=1) for _ in range(reps)]
    rows = [row[::-1] if i % 2 else row for i, row in enumerate(rows)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0)), float(slide.properties[openslide.PROPERTY_NAME_MPP_X])


def draw_strokes(shape: tuple[int, int], mpp: float, seed: int = 0) -> dict[str, np.ndarray]:
    """{ink: coverage in [0, 1] at level 0}: random wandering strokes, drawn at 1/8 and smoothed."""
    height, width = shape
    rng = np.random.default_rng(seed)
    scale = 8
    coverage = {}
    for ink, count in STROKES.items():
        canvas = Image.new("L", (width // scale, height // scale), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(count):
            points = [(rng.uniform(0.05, 0.95) * width / scale, rng.uniform(0.05, 0.95) * height / scale)]
            angle = rng.uniform(0, 2 * np.pi)
            for _ in range(6):
                angle += rng.normal(0, 0.5)
                step = rng.uniform(0.06, 0.12) * max(height, width) / scale
                points.append((points[-1][0] + step * np.cos(angle), points[-1][1] + step * np.sin(angle)))
            draw.line(points, fill=255, width=round(STROKE_UM / mpp / scale), joint="curve")
        small = ndi.gaussian_filter(np.asarray(canvas, np.float32) / 255, RIM_UM / mpp / scale)
        coverage[ink] = np.clip(
            np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)), 0, 1
        )
    return coverage


def ink_over(rgb: np.ndarray, coverage: dict[str, np.ndarray], rows: int = 512) -> np.ndarray:
    out = rgb.copy()
    for y in range(0, rgb.shape[0], rows):
        part = slice(y, y + rows)
        density = sum(
            c[part, :, None] * -np.log(np.array(INK_TRANSMISSION[ink], np.float32)) for ink, c in coverage.items()
        )
        out[part] = np.clip(np.rint(rgb[part] * np.exp(-density)), 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def inked_slides(tmp_path_factory, shared_data):
    """(clean slide, inked slide, {ink: ground-truth coverage at 1/GT_STEP}, mpp)."""
    folder = tmp_path_factory.mktemp("ink")
    rgb, mpp = cmu_mosaic(shared_data / "svs" / "CMU-1-Small-Region.svs")
    coverage = draw_strokes(rgb.shape[:2], mpp)
    write_pyramid_tiff(folder / "clean.tiff", rgb, mpp=mpp)
    write_pyramid_tiff(folder / "inked.tiff", ink_over(rgb, coverage), mpp=mpp)
    truth = {ink: c[::GT_STEP, ::GT_STEP] for ink, c in coverage.items()}
    return folder / "clean.tiff", folder / "inked.tiff", truth, mpp


def under_tiles(grid: TileGrid, mask: np.ndarray) -> np.ndarray:
    """Fraction of each tile of ``grid`` covered by ``mask`` (a level-0 mask kept at 1/GT_STEP)."""
    x0, y0 = grid.x / GT_STEP, grid.y / GT_STEP
    size = grid.tile_level0_px / GT_STEP
    return area_fractions(mask.astype(np.float32), x0, y0, x0 + size, y0 + size)


def params(tile_px: int) -> TilingParams:
    return replace(TilingParams.from_config(default_config()), tile_px=tile_px)


@pytest.mark.shared_data
@pytest.mark.parametrize("tile_px", [224, 112])
def test_at_most_one_in_a_thousand_kept_tiles_is_a_quarter_ink(inked_slides, tile_px):
    clean_path, inked_path, truth, _ = inked_slides
    ink = np.maximum.reduce(list(truth.values())) >= 0.5  # the stroke, up to half-way down its rim
    inked = tile_slide(inked_path, "inked", params=params(tile_px)).grid
    inky = under_tiles(inked, ink) >= 0.25
    assert inky.sum() <= 0.001 * len(inked), f"{inky.sum()} of {len(inked)} kept tiles are at least 25 % ink"
    # measured: 0 of 239 (224 px) and 0 of 1,017 (112 px); before the fix 3 and 13, all blue
    # the test means something: each ink lies across tissue that the clean slide tiles
    clean = tile_slide(clean_path, "clean", params=params(tile_px)).grid
    for name, coverage in truth.items():
        assert (under_tiles(clean, coverage >= 0.5) >= 0.25).sum() >= 10, name
    assert len(inked) >= 200


@pytest.mark.shared_data
@pytest.mark.parametrize(("tile_px", "kept_share"), [(224, 0.98), (112, 0.95)])
def test_tissue_away_from_the_ink_is_kept(inked_slides, tile_px, kept_share):
    clean_path, inked_path, truth, mpp = inked_slides
    clean = tile_slide(clean_path, "clean", params=params(tile_px)).grid
    inked = tile_slide(inked_path, "inked", params=params(tile_px)).grid
    # tiles of the clean slide that not even the faint rim of a stroke touches (the rest of the loss is the
    # 100 µm margin by which marks are widened)
    untouched = under_tiles(clean, np.maximum.reduce(list(truth.values())) >= 0.02) == 0
    kept = set(zip(inked.x.tolist(), inked.y.tolist(), strict=True))
    clean_keys = list(zip(clean.x.tolist(), clean.y.tolist(), strict=True))
    share = np.mean([key in kept for key, far in zip(clean_keys, untouched, strict=True) if far])
    assert untouched.sum() >= 200 and share >= kept_share  # measured 1.0 and 0.968
    # and on the clean slide, pen removal takes no tissue (the epidermis is dense, blue-violet haematoxylin)
    no_pen = TissueParams.from_config(default_config({"tissue": {"remove_pen": False}}))
    assert len(clean) == len(tile_slide(clean_path, "clean", params=params(tile_px), tissue_params=no_pen).grid)


def test_blue_ink_over_tissue_colours():
    he = [(165, 112, 147), (220, 165, 195), (99, 39, 94), (80, 70, 140), (160, 36, 73), (232, 180, 213)]
    over_tissue = [(53, 69, 166), (34, 41, 141), (70, 60, 160), (60, 70, 130)]  # blue ink over eosin, haematoxylin
    for colour in he:
        assert not blue_ink_over_tissue_mask(np.full((2, 2, 3), colour, np.uint8)).any(), colour
    for colour in over_tissue:
        rgb = np.full((2, 2, 3), colour, np.uint8)
        assert blue_ink_over_tissue_mask(rgb).all(), colour
        assert not pen_mask(rgb).any(), colour  # what the hue rule missed
