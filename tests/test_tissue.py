"""Tests of tissue detection (histoclip.tiling.tissue).

Two kinds: synthetic images with a known answer (a stained disc on glass, holes, specks, ink strokes,
transparent pixels), and the real histolab thumbnails and tiles in ``shared/data`` with pen marks, which
is what the defaults were tuned on.

Pixel sizes of the real images are not recorded in the files, so they are estimated from what is in them:

- ``tcga-red-pen.png``: fat cells 20-40 px across (they are 60-120 µm), nuclei 2-3 px, so about 3 µm/px.
- ``wsi-blue-pen.png``: a whole-slide overview 174 px wide; the marker stroke is about 10 px wide (a
  marker line is 0.3-0.6 mm), so about 30-60 µm/px.
- ``tcga-lung-rgb.png``: nuclei 15-20 px (they are 7-10 µm), so about 0.5 µm/px: a field inside a
  specimen, not a whole-slide thumbnail.
- the 512 px tiles: level-0 tiles (their names say so) whose nuclei are 15-20 px, so 0.5 µm/px.

The thumbnails are also run at 16 and 32 µm/px (the range a tiling thumbnail has), because the pen and
"tissue is found" checks must not depend on the exact guess.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

from histoclip.config import default_config
from histoclip.tiling.tissue import (
    TissueParams,
    detect_tissue,
    otsu_threshold,
    pen_mask,
    saturation,
    tissue_fraction,
)

# Colours measured on the real slides (see module docstring of histoclip.tiling.tissue).
GLASS = (242, 240, 243)
EOSIN = (206, 104, 146)
HAEMATOXYLIN = (120, 60, 140)
BLUE_INK = (78, 135, 210)
GREEN_INK = (49, 162, 140)
RED_INK = (193, 20, 26)
BLACK_INK = (25, 22, 28)

MPP = 8.0  # synthetic slides are thumbnails at 8 µm/px: 400 px = 3.2 mm


# --- synthetic slides -----------------------------------------------------------------------------------


def _glass(shape: tuple[int, int] = (400, 400), seed: int = 0) -> np.ndarray:
    """Float RGB image of empty glass with scanner noise."""
    rng = np.random.default_rng(seed)
    img = np.empty((*shape, 3), dtype=np.float32)
    img[:] = GLASS
    img += rng.normal(0.0, 3.0, img.shape)
    return img


def _paint_tissue(img: np.ndarray, where: np.ndarray, seed: int = 1) -> None:
    """H&E-like texture: eosin background with smooth patches of haematoxylin and per-pixel noise."""
    rng = np.random.default_rng(seed)
    t = ndi.gaussian_filter(rng.random(where.shape), 3)
    t = np.clip((t - t.min()) / (np.ptp(t) + 1e-9), 0, 1)[..., None]
    colour = (1 - t) * np.array(EOSIN, np.float32) + t * np.array(HAEMATOXYLIN, np.float32)
    colour += rng.normal(0.0, 4.0, colour.shape)
    img[where] = colour[where]


def _u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _stroke(shape: tuple[int, int], xy: list[tuple[int, int]], width: int) -> np.ndarray:
    im = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(im).line(xy, fill=255, width=width)
    return np.asarray(im) > 0


def test_stained_disc_on_glass_is_found_exactly() -> None:
    shape = (400, 400)
    disc = _disc(shape, 200, 200, 120)
    img = _glass(shape)
    _paint_tissue(img, disc)
    mask = detect_tissue(_u8(img), MPP)
    assert mask.dtype == bool and mask.shape == shape
    assert _iou(mask, disc) > 0.95


def test_tissue_cut_by_the_image_edge_is_not_shaved_off() -> None:
    # Erosion must not treat the world outside the image as glass, or every slide whose tissue reaches
    # the thumbnail edge loses a band there.
    shape = (400, 400)
    disc = _disc(shape, 200, 0, 150)
    img = _glass(shape)
    _paint_tissue(img, disc)
    mask = detect_tissue(_u8(img), MPP)
    assert _iou(mask, disc) > 0.95
    assert mask[150:250, 0].all()


@pytest.mark.parametrize("mpp", [0.5, 4.0, 16.0])
def test_blank_glass_with_noise_and_dust_is_empty(mpp: float) -> None:
    img = _glass((400, 400), seed=3)
    rng = np.random.default_rng(4)
    for y, x in rng.integers(10, 390, size=(30, 2)):
        img[y - 1 : y + 2, x - 1 : x + 2] = (95, 92, 96)  # grey dust grains
    mask = detect_tissue(_u8(img), mpp)
    assert not mask.any()


def test_small_specks_are_dropped_and_larger_pieces_kept() -> None:
    shape = (400, 400)
    main = _disc(shape, 200, 200, 90)
    # 0.02 mm² at 8 µm/px is 312 px.  Specks of radius 4 px (~50 px) must go, a piece of radius 13 px
    # (~530 px = 0.034 mm²) must stay.  All far enough apart that closing can't merge them.
    specks = np.zeros(shape, dtype=bool)
    for cy, cx in [(30, 30), (30, 370), (370, 30), (200, 30)]:
        specks |= _disc(shape, cy, cx, 4)
    piece = _disc(shape, 360, 360, 13)
    img = _glass(shape)
    _paint_tissue(img, main | specks | piece)
    mask = detect_tissue(_u8(img), MPP)
    assert not (mask & specks).any()
    assert (mask & piece).sum() > 0.9 * piece.sum()
    assert _iou(mask & main, main) > 0.95


def test_small_holes_are_filled_and_large_holes_kept() -> None:
    shape = (400, 400)
    disc = _disc(shape, 200, 200, 170)
    # Radius 10 px = 0.02 mm² (< 0.1 mm²) and 20 px wide, too wide for the closing (radius 50 µm = 6 px)
    # to fill, so only hole filling can.  Radius 55 px = 0.6 mm² is a real opening.
    small_hole = _disc(shape, 200, 110, 10)
    large_hole = _disc(shape, 200, 260, 55)
    img = _glass(shape)
    _paint_tissue(img, disc & ~small_hole & ~large_hole)
    mask = detect_tissue(_u8(img), MPP)
    assert mask[small_hole].all()
    assert mask[large_hole].mean() < 0.1
    assert _iou(mask, disc & ~large_hole) > 0.95
    # With hole filling off the small hole stays open.
    mask_no_fill = detect_tissue(
        _u8(img), MPP, TissueParams.from_config(default_config({"tissue": {"max_hole_area_mm2": 0}}))
    )
    assert mask_no_fill[small_hole].mean() < 0.2


INKS = {"blue": BLUE_INK, "green": GREEN_INK, "red": RED_INK, "black": BLACK_INK}


@pytest.mark.parametrize("ink", list(INKS.values()), ids=list(INKS))
def test_ink_strokes_across_tissue_are_excluded(ink: tuple[int, int, int]) -> None:
    shape = (400, 400)
    disc = _disc(shape, 200, 200, 140)
    stroke = _stroke(shape, [(0, 120), (400, 300)], width=40)  # 320 µm wide, tissue and glass
    img = _glass(shape)
    _paint_tissue(img, disc)
    rng = np.random.default_rng(5)
    img[stroke] = np.array(ink, np.float32) + rng.normal(0.0, 4.0, (int(stroke.sum()), 3))
    rgb = _u8(img)

    mask = detect_tissue(rgb, MPP)
    assert not (mask & stroke).any()
    # Tissue beyond the margin (100 µm = 13 px) plus a few px of closing is still found.
    far = disc & (ndi.distance_transform_edt(~stroke) > 20)
    assert mask[far].mean() > 0.95

    if ink != BLACK_INK:
        assert pen_mask(rgb)[stroke].mean() > 0.9
        # Without pen removal the coloured stroke on glass is taken for tissue: the check above is
        # meaningful.
        raw = detect_tissue(rgb, MPP, TissueParams.from_config(default_config({"tissue": {"remove_pen": False}})))
        assert raw[stroke & ~disc].mean() > 0.5


@pytest.mark.parametrize(
    "colour",
    [
        EOSIN,
        (195, 124, 165),  # eosin, lighter
        (232, 180, 213),  # pale stroma
        (230, 60, 110),  # intense eosin
        (99, 39, 94),  # haematoxylin, dark
        (80, 70, 140),  # blue-violet haematoxylin
        (160, 36, 73),  # red blood cells (tcga-lung, full resolution)
        (161, 58, 91),
        GLASS,
        (128, 128, 128),
    ],
)
def test_pen_mask_leaves_he_colours_alone(colour: tuple[int, int, int]) -> None:
    assert not pen_mask(np.full((4, 4, 3), colour, np.uint8)).any()


@pytest.mark.parametrize(
    "colour",
    [BLUE_INK, (116, 162, 219), (40, 80, 190), GREEN_INK, (54, 163, 144), RED_INK, (150, 21, 29)],
)
def test_pen_mask_finds_ink_colours(colour: tuple[int, int, int]) -> None:
    assert pen_mask(np.full((4, 4, 3), colour, np.uint8)).all()


def test_eosin_tissue_is_not_pen() -> None:
    shape = (200, 200)
    img = _glass(shape)
    _paint_tissue(img, _disc(shape, 100, 100, 80))
    assert not pen_mask(_u8(img)).any()


def test_transparent_pixels_are_background() -> None:
    shape = (400, 400)
    disc = _disc(shape, 200, 200, 120)
    img = _glass(shape)
    _paint_tissue(img, disc)
    rgba = np.dstack([_u8(img), np.full(shape, 255, np.uint8)])
    # OpenSlide returns (0, 0, 0, 0) outside the scanned regions: here the left half, cutting the disc.
    rgba[:, :200] = 0
    for mpp in (MPP, 1.0):  # 1 µm/px goes through block averaging
        mask = detect_tissue(rgba, mpp)
        assert not mask[:, :200].any()
        assert _iou(mask, disc & (np.arange(400) >= 200)[None, :]) > 0.9
    assert not detect_tissue(np.zeros((50, 50, 4), np.uint8), MPP).any()


def test_odd_sizes_at_full_resolution_keep_the_input_shape() -> None:
    # 0.5 µm/px is block-averaged by 8; 203 x 77 is no multiple of that.
    shape = (203, 77)
    img = _glass(shape)
    _paint_tissue(img, np.ones(shape, dtype=bool))
    mask = detect_tissue(
        _u8(img), 0.5, TissueParams.from_config(default_config({"tissue": {"min_region_area_mm2": 0}}))
    )
    assert mask.shape == shape
    assert mask.all()


@pytest.mark.parametrize(
    ("rgb", "message"),
    [
        (np.zeros((10, 10), np.uint8), "H x W x 3"),
        (np.zeros((10, 10, 2), np.uint8), "H x W x 3"),
        (np.zeros((2, 10, 10, 3), np.uint8), "H x W x 3"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.zeros((10, 10, 3), np.float32), "uint8"),
    ],
)
def test_bad_images_are_refused(rgb: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        detect_tissue(rgb, MPP)


@pytest.mark.parametrize("mpp", [0, -1.0, float("nan"), float("inf"), None, "8", True])
def test_bad_mpp_is_refused(mpp: object) -> None:
    with pytest.raises(ValueError, match="mpp must be a positive"):
        detect_tissue(np.zeros((10, 10, 3), np.uint8), mpp)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"closing_um": -1}, "closing_um must be >= 0"),
        ({"min_saturation": 1.5}, "min_saturation is a fraction"),
        ({"min_region_area_mm2": float("nan")}, "finite number"),
        ({"remove_pen": "yes"}, "remove_pen must be true or false"),
        ({"hysteresis": 2}, "hysteresis is a fraction"),
    ],
)
def test_bad_params_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(TissueParams.from_config(default_config()), **kwargs)  # type: ignore[arg-type]


def test_saturation_values() -> None:
    rgb = np.array([[GLASS, (255, 0, 0), (200, 100, 100), (0, 0, 0)]], np.uint8)
    sat = saturation(rgb)
    assert sat.dtype == np.float32
    np.testing.assert_allclose(sat[0], [3 / 243, 1.0, 0.5, 0.0], atol=1e-6)
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])
    np.testing.assert_array_equal(saturation(rgba), sat)


def test_otsu_threshold_splits_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.02, 0.01, 9000), rng.normal(0.4, 0.05, 1000)]).clip(0, 1)
    assert 0.05 < otsu_threshold(values) < 0.35
    assert otsu_threshold(np.full(100, 0.3)) <= 0.3  # nothing to split: everything in the upper class
    with pytest.raises(ValueError, match="empty"):
        otsu_threshold(np.array([]))


def test_tissue_fraction() -> None:
    assert tissue_fraction(np.array([[True, False], [False, False]])) == 0.25
    with pytest.raises(ValueError):
        tissue_fraction(np.zeros((0, 3), bool))


# --- real slides ------------------------------------------------------------------------------------------


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _stained(rgb: np.ndarray) -> np.ndarray:
    """A crude, independent reference: clearly stained pixels that are not ink."""
    ink = ndi.binary_dilation(pen_mask(rgb), iterations=3)
    return (saturation(rgb) >= 0.15) & ~ink & (rgb[..., :3].max(axis=2) > 76)


THUMBNAILS = [
    # name, mpp, tissue fraction range (measured 0.61-0.64, 0.32-0.36, 0.78-0.79)
    ("tcga-red-pen", 3.0, (0.5, 0.75)),
    ("tcga-red-pen", 16.0, (0.5, 0.75)),
    ("tcga-red-pen", 32.0, (0.5, 0.75)),
    ("wsi-blue-pen", 16.0, (0.25, 0.45)),
    ("wsi-blue-pen", 32.0, (0.25, 0.45)),
    ("wsi-blue-pen", 60.0, (0.25, 0.45)),
    ("tcga-lung-rgb", 16.0, (0.65, 0.9)),
    ("tcga-lung-rgb", 32.0, (0.65, 0.9)),
]


@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "mpp", "expected"), THUMBNAILS, ids=[f"{n}@{m}" for n, m, _ in THUMBNAILS])
def test_thumbnails(shared_data: Path, name: str, mpp: float, expected: tuple[float, float]) -> None:
    rgb = _load(shared_data / "thumbnails-histolab" / f"{name}.png")
    mask = detect_tissue(rgb, mpp)
    pen = pen_mask(rgb)
    stained = _stained(rgb)

    # Ink is not tissue.  A handful of isolated ink-coloured pixels (a red blood cell clump, a fleck of
    # ink cut by the image edge, a blue-black nucleus) are below the minimum mark size and may stay: at
    # most 0.1 % of them, or one such pixel where the image has almost no ink at all.
    assert (pen & mask).sum() <= max(1, 0.001 * pen.sum())
    # Tissue is found, in the range seen on the overlays (the ink and the glass are the rest) ...
    low, high = expected
    assert low <= tissue_fraction(mask) <= high
    # ... it covers most clearly stained, non-ink pixels (some are lost to the 100 µm ink margin) ...
    assert (mask & stained).sum() >= 0.75 * stained.sum()
    # ... and it is mostly stained pixels, not glass (the rest is filled gaps and holes).
    assert (mask & (saturation(rgb) >= 0.08)).sum() >= 0.8 * mask.sum()


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("tcga-red-pen", 0.05, 0.3), ("wsi-blue-pen", 0.015, 0.1), ("tcga-lung-rgb", 0.0, 0.001)],
)
def test_pen_mask_on_thumbnails(shared_data: Path, name: str, low: float, high: float) -> None:
    # Measured: 15.7 % red ink, 2.9 % blue ink (three strokes at the right edge), 0.001 % on the lung
    # field (3 px of blue-black nucleus).
    pen = pen_mask(_load(shared_data / "thumbnails-histolab" / f"{name}.png"))
    assert low <= pen.mean() <= high


@pytest.mark.shared_data
def test_lung_field_at_its_own_resolution_is_all_tissue(shared_data: Path) -> None:
    # At 0.5 µm/px the 512 px field is 0.26 mm across, cut from inside a specimen: its air spaces are
    # 25-75 µm gaps that the closing bridges, so for tiling the whole field is tissue.
    rgb = _load(shared_data / "thumbnails-histolab" / "tcga-lung-rgb.png")
    assert tissue_fraction(detect_tissue(rgb, 0.5)) >= 0.95


TILES = {
    # name: (lowest, highest) tissue fraction.  Measured: 1.0, 0.88 and 0.0 for all the empty ones.  The
    # second tissue tile has glass in one corner (about 12 % of it).  A tiler typically keeps tiles with
    # at least half tissue, so "tissue" means >= 0.75 and "empty" <= 0.05, with room either side.
    "tissue-level0-4302-10273-4814-10785": (0.9, 1.0),
    "tissue-level0-7352-11762-7864-12274": (0.75, 0.95),
    "almost-white-1": (0.0, 0.05),
    # A sliver of tissue enters one corner (about 3 % of the tile), below the minimum region size.
    "almost-white-2": (0.0, 0.05),
    "no-tissue": (0.0, 0.05),
    "no-tissue2": (0.0, 0.05),
    "no-tissue-line": (0.0, 0.05),
    "no-tissue-green-pen": (0.0, 0.05),
    # Red ink with black ink over it: the black part is only caught by the near-black rule and margin.
    "no-tissue-red-pen": (0.0, 0.05),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("name", list(TILES))
def test_tiles(shared_data: Path, name: str) -> None:
    rgb = _load(shared_data / "tiles-histolab" / f"{name}.png")
    low, high = TILES[name]
    assert low <= tissue_fraction(detect_tissue(rgb, 0.5)) <= high
    # Were they 40x tiles (0.25 µm/px), a lone tile would be 0.016 mm², below min_region_area_mm2; with
    # that check off the verdict (tissue or empty) must not change.  (The glass corner of the second
    # tissue tile is then only 40 µm across and is closed over, hence no upper bound for tissue tiles.)
    quarter = tissue_fraction(
        detect_tissue(rgb, 0.25, TissueParams.from_config(default_config({"tissue": {"min_region_area_mm2": 0}})))
    )
    assert quarter >= low if low > 0 else quarter <= high
