"""Tissue detection on a low-resolution image of an H&E slide.

Tiling only needs to know *where* tissue is, so this runs on a thumbnail (typically 4-16 µm/px) and is
cheap: a 4000 x 4000 thumbnail takes 1-2 s on one core.  Everything that has a physical size
(structuring elements, minimum fragment size, maximum hole size) is given in micrometres or mm² and
converted with the thumbnail's own µm/px, so the same config behaves the same whichever pyramid level or
scanner the thumbnail comes from.

Pipeline (see :func:`detect_tissue`): images finer than ``working_mpp`` block-averaged -> pen ink and
near-black marks found and widened by a margin -> Otsu threshold on the HSV saturation of the rest, never
below a floor, with hysteresis -> closing, opening -> small holes filled -> marks removed again -> small
fragments dropped.

Saturation rather than brightness is thresholded because stained tissue is coloured while the glass
background is grey-white at any exposure; brightness also varies with the scanner's white balance and
with slide thickness, saturation much less so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage as ndi

from histoclip.config import SectionSettings, default_config

__all__ = [
    "TissueParams",
    "blue_ink_over_tissue_mask",
    "detect_tissue",
    "otsu_threshold",
    "pen_mask",
    "saturation",
    "tissue_fraction",
]

# 8-connectivity for tissue, 4-connectivity for background: the usual dual pair, so that a diagonal
# chain of tissue pixels both joins two tissue pieces and closes off the hole it surrounds.
_EIGHT = np.ones((3, 3), dtype=bool)
_FOUR = ndi.generate_binary_structure(2, 1)

# Marker strokes are about half a millimetre wide and longer than that; ink-coloured or near-black
# specks below 0.001 mm² (a 30 µm square) are something else (a blue-black nucleus, dust, a JPEG artefact).
_MIN_MARK_AREA_MM2 = 0.001
_MIN_DARK_MARK_AREA_MM2 = 0.01

_OTSU_SAMPLE_PX = 4_000_000


@dataclass(frozen=True)
class TissueParams(SectionSettings, section="tissue"):
    """Settings of :func:`detect_tissue`; the field names are also the config keys (the ``tissue`` section but its
    ``mpp``: which level is read, not how it is thresholded).

    The defaults (config/schemas/config.schema.yaml, the one place they are set) are for H&E thumbnails at
    4-16 µm/px and were checked on real slides with blue, green, red and black marks (tests/test_tissue.py);
    why each value:

    - ``min_saturation = 0.08``: floor under the Otsu threshold.  Glass, dust and scanner noise stay
      below about 0.04 saturation (99th percentile on the blank tiles checked), while the Otsu cut
      between glass and tissue on the slides checked is 0.14-0.25.  On a blank slide Otsu still
      splits the noise in two, and this floor stops that from becoming "tissue".
    - ``hysteresis = 0.5``: pixels down to this fraction of the threshold (never below the floor) are
      tissue when they touch pixels above it.  Otsu puts the cut between glass and *typical* tissue, so
      pale fringes (loose stroma, fat septa, thin sections) would be lost; requiring contact with
      clearly stained tissue keeps isolated pale specks out.
    - ``max_value_dark = 0.3``: pixels whose brightest channel is at most 30 % of full scale are black
      ink, ink over ink, slide edges or the core of a fold; haematoxylin-dense tissue stays above about
      0.35 even at full resolution.  Their saturation is noise (tiny denominators), so they would
      otherwise pass Otsu.  Large dark areas are treated like pen marks (margin included).
    - ``remove_pen = True``: marker ink is saturated and would be taken for tissue; see :func:`pen_mask` and, for
      blue ink lying over tissue, :func:`blue_ink_over_tissue_mask`.
    - ``pen_margin_um = 100``: marks are widened by this much.  Ink sits on the coverslip, out of focus,
      so strokes have a soft, half-saturated pink, pale-blue or grey rim that the colour rules miss; on
      the slides checked it is 50-100 µm wide.  Losing 100 µm of tissue along a mark costs little.
    - ``closing_um = 50``: bridges pale gaps inside tissue (between fat cells, in loose stroma, small
      tears) up to about 100 µm wide, without merging fragments that lie farther apart.
    - ``opening_um = 8``: removes threads, dust and single noisy pixels (one pixel at 4-16 µm/px) while
      keeping thin real tissue such as a strip of mucosa.
    - ``min_region_area_mm2 = 0.02``: dust, debris and floaters are smaller (a 140 µm square); the
      smallest tissue worth tiling, a needle-biopsy fragment, is larger.  0.02 mm² is about 1.6 tiles of
      224 px at 0.5 µm/px.
    - ``max_hole_area_mm2 = 0.1``: holes up to a 300 µm square (vessel lumens, cracks, fat cells, pale
      patches) belong to the tissue; bigger openings (large lumens, cysts, fat lobules) stay open so the
      tiler doesn't spend tiles on empty glass.
    - ``working_mpp = 4``: images finer than this are block-averaged to about 4 µm/px first.  The colour
      rules and the Otsu statistics assume thumbnail pixels, which average nuclei, stroma and small gaps
      together; at full resolution every nucleus, fibre gap and dust grain would be judged on its own.
      It also bounds the run time.  0 turns it off.
    """

    min_saturation: float
    hysteresis: float
    max_value_dark: float
    remove_pen: bool
    pen_margin_um: float
    closing_um: float
    opening_um: float
    min_region_area_mm2: float
    max_hole_area_mm2: float
    working_mpp: float

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "remove_pen":
                if not isinstance(value, bool):
                    raise ValueError(f"TissueParams.remove_pen must be true or false, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"TissueParams.{f.name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"TissueParams.{f.name} must be >= 0, got {value!r}")
        for name in ("min_saturation", "max_value_dark", "hysteresis"):
            if getattr(self, name) > 1:
                raise ValueError(
                    f"TissueParams.{name} is a fraction and must be in [0, 1], got {getattr(self, name)!r}"
                )


def _check_rgb(rgb: np.ndarray, name: str = "rgb") -> np.ndarray:
    """Validate an 8-bit RGB/RGBA image; float images are refused because 0-1 vs 0-255 is ambiguous."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(
            f"{name} must be an H x W x 3 (RGB) or H x W x 4 (RGBA) image, got an array of shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if arr.dtype != np.uint8:
        source = "as read from OpenSlide or Pillow"
        raise ValueError(f"{name} must be 8-bit (dtype uint8) {source}, got dtype {arr.dtype}")
    return arr


def _check_mpp(mpp: float) -> float:
    # Strings and booleans are refused rather than coerced: a quoted "8" in a config or a True from a
    # YAML typo is a mistake worth hearing about.
    ok = isinstance(mpp, int | float | np.integer | np.floating) and not isinstance(mpp, bool | np.bool_)
    if not ok or not math.isfinite(mpp) or mpp <= 0:
        raise ValueError(
            f"mpp must be a positive, finite number of micrometres per pixel of this image "
            f"(not of level 0), got {mpp!r}"
        )
    return float(mpp)


def _planes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Contiguous R, G, B planes: element-wise work on them is several times faster than on the
    # interleaved image, and reductions over a length-3 last axis (arr.max(axis=2)) are slower still.
    planes = np.ascontiguousarray(np.moveaxis(rgb[..., :3], 2, 0))
    return planes[0], planes[1], planes[2]


def _max_min(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def _saturation(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    out = (hi - lo).astype(np.float32)
    # Where hi == 0 the chroma is 0 too, so dividing by max(hi, 1) gives the conventional 0.
    out /= np.maximum(hi, 1)
    return out


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation, (max - min) / max, as float32 in [0, 1] (0 for black pixels).

    An alpha channel, if present, is ignored.
    """
    return _saturation(*_max_min(*_planes(_check_rgb(rgb))))


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or red marker ink, as a bool H x W mask.

    The rules use channel differences and ratios of the 8-bit values; they rely on H&E having a narrow
    range of hues (pink to violet: red is the largest channel or close to it, green is the smallest):

    - blue ink: B exceeds R by >= 40 and G by >= 15, *and* G - R >= (B - R) / 5, i.e. hue <= 228 degrees.
      The last condition is what separates ink from haematoxylin: marker blue is cyan-leaning (hue 210-222
      degrees on the slides checked), while haematoxylin is violet (hue above 240 degrees, R above G)
      and only its darkest nuclei at full resolution drift to about 235 degrees.
    - green ink: G exceeds R by >= 25 and is no more than 10 below B (green to teal).  H&E never has G
      above R, so this cannot hit tissue.
    - red ink: R >= 80 with G < 0.25 R and B < 0.4 R.  Eosin and red blood cells are pink rather than
      red: they keep much more blue relative to red (B/R >= 0.44 on the slides checked, against at most
      0.35 in the ink core) and, except in red cells, more green too (G/R >= 0.28 against < 0.25).

    Black ink is not a colour and is handled by the near-black rule of :func:`detect_tissue`.  The soft
    rim of a stroke is not caught here; :func:`detect_tissue` dilates this mask to cover it.
    """
    return _pen_mask(*_planes(_check_rgb(rgb)))


def _pen_mask(r8: np.ndarray, g8: np.ndarray, b8: np.ndarray) -> np.ndarray:
    r, g, b = r8.astype(np.int16), g8.astype(np.int16), b8.astype(np.int16)
    b_r, g_r = b - r, g - r
    blue = (b_r >= 40) & (b - g >= 15) & (5 * g_r >= b_r)
    green = (g_r >= 25) & (g + 10 >= b)
    # Integer form of G < 0.25 R and B < 0.4 R, to avoid float temporaries on large thumbnails.
    red = (r >= 80) & (4 * g < r) & (5 * b < 2 * r)
    return blue | green | red


def blue_ink_over_tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that look like blue marker ink over stained tissue, as a bool H x W mask.

    Ink over tissue multiplies the tissue's colour by the ink's transmission, so the eosin underneath pulls green
    down and the stroke turns violet-blue: :func:`pen_mask`'s hue rule (green at least a fifth of the way from red
    to blue) misses it, which is how blue strokes across tissue were kept while green ones went. What is left of
    the ink is its strong red absorption: B >= 2 R, with B - R >= 40 and B - G >= 15. H&E stays below that at
    thumbnail scale (the tissue of CMU-1-Small-Region: B/R at most 1.63; tcga-red-pen: 99.9th percentile 1.15;
    blue-violet haematoxylin is about 1.75), while blue ink over tissue is 1.9 (5th percentile) to 3.4 (median)
    on strokes drawn with a real marker's transmission (tests/test_pen_ink.py).

    Single blue-black nuclei at full resolution pass this colour test too, so :func:`detect_tissue` counts only
    regions of stroke size (as large as a near-black mark must be), never specks.
    """
    r8, g8, b8 = _planes(_check_rgb(rgb))
    return _blue_over_tissue(r8, g8, b8)


def _blue_over_tissue(r8: np.ndarray, g8: np.ndarray, b8: np.ndarray) -> np.ndarray:
    r, g, b = r8.astype(np.int16), g8.astype(np.int16), b8.astype(np.int16)
    return (b - r >= 40) & (b - g >= 15) & (b >= 2 * r)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (expected in [0, 1]): the cut maximising between-class variance.

    Values outside [0, 1] are clipped.  Pixels at or above the returned value form the upper class.
    A histogram rather than a sort keeps this linear in the number of pixels.
    """
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    v = np.asarray(values, dtype=np.float32).ravel()
    if v.size == 0:
        raise ValueError("otsu_threshold needs at least one value, got an empty array")
    idx = (np.clip(v, 0.0, 1.0) * bins).astype(np.int32)
    np.minimum(idx, bins - 1, out=idx)
    hist = np.bincount(idx, minlength=bins).astype(np.float64)
    centres = (np.arange(bins) + 0.5) / bins
    w0 = np.cumsum(hist)[:-1]  # class 0 = bins [0, k], for k = 0 .. bins-2
    w1 = v.size - w0
    m0 = np.cumsum(hist * centres)[:-1]  # first moments of the two classes
    m1 = float(hist @ centres) - m0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - m1 / w1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1.0
    if between.max() < 0:
        # One occupied bin: nothing to split.  Returning its lower edge puts every value in the upper
        # class; callers that want "no foreground" on a uniform image rely on their own floor.
        return float(idx[0]) / bins
    k = int(np.argmax(between))
    return (k + 1) / bins


def _radius_px(um: float, mpp: float) -> int:
    # A non-zero size never rounds down to "off": at coarse mpp the smallest disc (a 3 x 3 cross) is the
    # closest we can get.
    return max(1, round(um / mpp)) if um > 0 else 0


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a disc of ``radius`` px; nothing beyond the image border is assumed to be set.

    Only the bounding box of the set pixels (plus the radius) is processed: pen marks usually cover a
    small part of the slide, and the margin around them is the largest radius used.
    """
    if radius <= 0:
        return mask.copy()
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return mask.copy()
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1 = max(rows[0] - radius, 0), min(rows[-1] + radius + 1, mask.shape[0])
    x0, x1 = max(cols[0] - radius, 0), min(cols[-1] + radius + 1, mask.shape[1])
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = _dilate_full(mask[y0:y1, x0:x1], radius)
    return out


def _dilate_full(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a disc, as a union of row-shifted 1-D dilations.

    A disc is a stack of horizontal chords, so dilating by it is: for each chord half-width w, a 1-D
    running maximum of width 2w + 1 along rows (linear time whatever w), OR-ed in at every row offset
    whose chord has that half-width.  This is exact and about twice as fast as
    ``ndimage.binary_dilation`` for the radii used here, which matters on 4000 px thumbnails.
    """
    h = mask.shape[0]
    src = np.ascontiguousarray(mask).view(np.uint8)
    out = np.zeros(mask.shape, dtype=bool)
    half_widths = [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)]
    dy = 0
    while dy <= radius:
        # Row offsets dy .. end (and their negatives) all have the same chord half-width.
        w = half_widths[dy]
        end = dy
        while end + 1 <= radius and half_widths[end + 1] == w:
            end += 1
        row = ndi.maximum_filter1d(src, 2 * w + 1, axis=1, mode="constant", cval=0).view(bool)
        for d in range(dy, min(end, h - 1) + 1):
            if d == 0:
                out |= row
            else:
                out[d:] |= row[: h - d]
                out[: h - d] |= row[d:]
        dy = end + 1
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    # Erosion as the complement of the dilated background.  Since _dilate sees no background beyond the
    # border, tissue cut by the image edge isn't eaten away from it (closing stays extensive, and
    # opening doesn't shave the edges).
    if radius <= 0:
        return mask.copy()
    return ~_dilate(~mask, radius)


def _hysteresis(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Pixels of ``weak`` connected to a pixel of ``strong`` (which must lie within ``weak``)."""
    if not strong.any():
        return strong
    labels, n = ndi.label(weak, structure=_EIGHT)
    keep = np.zeros(n + 1, dtype=bool)
    keep[labels[strong]] = True
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background components that don't touch the image border and have fewer than ``max_px``."""
    if max_px <= 0:
        return mask
    labels, n = ndi.label(~mask, structure=_FOUR)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    fill = sizes < max_px
    fill[0] = False
    # Background connected to the border is the outside of the tissue, not a hole.
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    fill[np.unique(border)] = False
    return mask | fill[labels]


def _remove_small_regions(mask: np.ndarray, min_px: float) -> np.ndarray:
    if min_px <= 0:
        return mask
    labels, n = ndi.label(mask, structure=_EIGHT)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _block_average(rgb3: np.ndarray, valid: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of each ``factor`` x ``factor`` block over its valid pixels, and which blocks count.

    Transparent pixels are left out of the mean (OpenSlide returns them as black, which would darken
    the block); a block is valid when at least half of its in-image pixels are.
    """
    h, w = valid.shape
    bh, bw = -(-h // factor), -(-w // factor)
    ph, pw = bh * factor - h, bw * factor - w
    weights = np.pad(valid, ((0, ph), (0, pw))).astype(np.float32)
    inside = np.pad(np.ones((h, w), dtype=np.float32), ((0, ph), (0, pw)))
    colour = np.pad(rgb3, ((0, ph), (0, pw), (0, 0))).astype(np.float32) * weights[..., None]

    def block_sum(x: np.ndarray) -> np.ndarray:
        return x.reshape(bh, factor, bw, factor, *x.shape[2:]).sum(axis=(1, 3))

    count = block_sum(weights)
    mean = block_sum(colour) / np.maximum(count, 1.0)[..., None]
    small = np.clip(np.rint(mean), 0, 255).astype(np.uint8)
    return small, (count > 0) & (2 * count >= block_sum(inside))


def detect_tissue(rgb: np.ndarray, mpp: float, params: TissueParams | None = None) -> np.ndarray:
    """Bool H x W mask of tissue in an 8-bit RGB(A) slide thumbnail whose pixel size is ``mpp`` µm.

    Pixels with alpha 0 (outside the scanned regions, as OpenSlide returns them) are background.  Pen
    ink and near-black marks, widened by ``params.pen_margin_um``, are never tissue, not even after
    closing or hole filling: a tile under a marker stroke or a fold is useless, and its colour would
    skew stain statistics.

    Images finer than ``params.working_mpp`` are block-averaged down to about that pixel size first and
    the mask is scaled back up, so the result doesn't depend much on which pyramid level is passed.
    ``params`` default to the config schema's.
    """
    params = params or TissueParams.from_config(default_config())
    arr = _check_rgb(rgb)
    mpp = _check_mpp(mpp)
    height, width = arr.shape[:2]

    # Background outside scanned regions (alpha 0): neither tissue nor part of the statistics.
    valid_full = arr[..., 3] > 0 if arr.shape[2] == 4 else np.ones((height, width), dtype=bool)
    rgb3 = arr[..., :3]
    factor = int(params.working_mpp // mpp) if params.working_mpp > 0 else 1
    if factor > 1:
        rgb3, valid = _block_average(rgb3, valid_full, factor)
        mpp *= factor
    else:
        factor, valid = 1, valid_full
    px_per_mm2 = (1000.0 / mpp) ** 2

    # Marks: pen ink by colour, and near-black (black ink, ink over ink, slide edges, fold cores).  Their
    # saturation says nothing about tissue (near-black pixels have noise-sized denominators).
    r, g, b = _planes(rgb3)
    hi, lo = _max_min(r, g, b)
    dark = (hi <= round(params.max_value_dark * 255)) & valid
    # Specks that merely have an ink colour (an odd blue-black nucleus, a JPEG artefact) are not marks, and
    # near-black patches must be stroke- or fold-sized: dense haematoxylin (epidermis, lymphoid aggregates)
    # reaches near-black in clusters of a few thousand µm² at thumbnail scale. Widening either by the margin
    # would punch holes in the tissue.
    marks = _remove_small_regions(dark, _MIN_DARK_MARK_AREA_MM2 * px_per_mm2)
    if params.remove_pen:
        marks |= _remove_small_regions(_pen_mask(r, g, b) & valid, _MIN_MARK_AREA_MM2 * px_per_mm2)
        # blue ink over tissue: nucleus-coloured pixel by pixel, so stroke-sized regions only
        marks |= _remove_small_regions(_blue_over_tissue(r, g, b) & valid, _MIN_DARK_MARK_AREA_MM2 * px_per_mm2)
    if marks.any():
        marks = _dilate(marks, _radius_px(params.pen_margin_um, mpp))

    candidates = valid & ~marks
    if not candidates.any():
        return np.zeros((height, width), dtype=bool)
    sat = _saturation(hi, lo)
    # The histogram of a regular subsample (at most ~4 Mpx) gives the same threshold to within a bin and
    # saves a good share of the run time on big thumbnails.
    step = max(1, math.isqrt(candidates.size // _OTSU_SAMPLE_PX))
    sample = sat[::step, ::step][candidates[::step, ::step]]
    high = max(otsu_threshold(sample if sample.size else sat[candidates]), params.min_saturation)
    low = max(params.min_saturation, params.hysteresis * high)
    mask = _hysteresis(candidates & (sat >= low), candidates & (sat >= high))

    close_r = _radius_px(params.closing_um, mpp)
    open_r = _radius_px(params.opening_um, mpp)
    if close_r:
        mask = _erode(_dilate(mask, close_r), close_r)
    if open_r:
        mask = _dilate(_erode(mask, open_r), open_r)

    mask = _fill_small_holes(mask, params.max_hole_area_mm2 * px_per_mm2)
    mask &= valid & ~marks
    mask = _remove_small_regions(mask, params.min_region_area_mm2 * px_per_mm2)
    if factor > 1:
        mask = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)[:height, :width] & valid_full
    return mask


def tissue_fraction(mask: np.ndarray) -> float:
    """Share of pixels that are tissue, in [0, 1]."""
    m = np.asarray(mask)
    if m.size == 0:
        raise ValueError("tissue_fraction needs a non-empty mask")
    return float(np.count_nonzero(m)) / m.size
