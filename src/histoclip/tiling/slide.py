"""Opening whole-slide images and the microns-per-pixel policy.

The physical resolution of level 0 (``mpp``, µm per pixel) decides what every tile means: get it wrong
and a "20x" tile is really 10x or 40x and every downstream number is silently off. So it is resolved in a
fixed order, each answer recorded with its source:

1. ``sheet``: the cohort sheet's ``mpp`` column (the user knows best);
2. ``openslide-metadata``: OpenSlide's ``openslide.mpp-x`` / ``-y`` (vendor metadata);
3. ``tiff-resolution``: the TIFF XResolution/YResolution tags of the first page (cm or inch units);
4. ``objective-power-estimate``: 10 / objective power (20x → 0.5), a rough estimate, with a warning.

Metadata values outside a plausible range (e.g. 352.78 µm/px, a 72-dpi default that TIFF writers put in)
are ignored with a warning. If nothing usable remains, the slide fails with a message that says to add an
``mpp`` value to the sheet.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from histoclip.config import SectionSettings, default_config
from histoclip.errors import SlideError

log = logging.getLogger(__name__)

#: Relative tolerance when comparing a level's mpp with a target: vendors store downsamples like 4.0004.
LEVEL_TOLERANCE = 0.01
#: Two mpp values closer than this (relative) are the same resolution.
ANISOTROPY_TOLERANCE = 0.02

MPP_SOURCES = ("sheet", "openslide-metadata", "tiff-resolution", "objective-power-estimate")


@dataclass(frozen=True)
class MppRange(SectionSettings, section="mpp"):
    """Plausible level-0 mpp values (µm/px) for a whole-slide image (config key ``mpp``)."""

    min: float
    max: float

    def __contains__(self, mpp: float) -> bool:
        return self.min <= mpp <= self.max


@dataclass(frozen=True)
class ResolvedMpp:
    mpp: float
    source: str
    warnings: tuple[str, ...] = ()


def open_wsi(path: str | Path, slide_id: str) -> openslide.OpenSlide:
    """Open ``path`` with OpenSlide, turning its exceptions into a :class:`SlideError` naming the slide.

    ``openslide.open_slide`` is deliberately not used: it falls back to PIL for plain images, which would
    load a whole "slide" into memory and hide that the file is not a pyramid.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(slide_id, f"file {str(path)!r} does not exist", fix="correct the path in the cohort sheet")
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        truncated = tiff_truncation(path)
        if truncated is not None:
            raise truncated_slide_error(slide_id, path, truncated) from exc
        if isinstance(exc, openslide.OpenSlideUnsupportedFormatError):
            raise SlideError(
                slide_id,
                f"{str(path)!r} is not a whole-slide format OpenSlide can read ({exc or 'unsupported format'})",
                fix="convert it to a pyramidal tiled TIFF (e.g. with vips tiffsave --tile --pyramid) or remove it",
            ) from exc
        raise SlideError(
            slide_id,
            f"OpenSlide cannot open {str(path)!r}: {exc}",
            fix="the file is damaged or uses an unsupported encoding; re-export or re-scan it, or remove it",
        ) from exc


def truncated_slide_error(slide_id: str, path: str | Path, why: str) -> SlideError:
    return SlideError(
        slide_id,
        f"{str(path)!r} is truncated: {why}",
        fix="the copy is incomplete (an interrupted download or transfer): copy the slide again from its source "
        "and compare its size or checksum with the original",
    )


class _TiffLog(logging.Handler):
    """Collects what tifffile logs (it reports a bad page offset as a log line, not an exception)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def tiff_truncation(path: str | Path) -> str | None:
    """Why a TIFF-family file (TIFF, BigTIFF, SVS, NDPI...) looks cut short, or None when it does not.

    A copy cut short by an interrupted transfer fails in OpenSlide with "Unsupported or missing image file"
    or a JPEG decoding error, both of which suggest the wrong fix (convert the file, re-scan the slide). Its
    TIFF directory, however, still points at image data or further directories past the end of the file.
    Reads only the directories (milliseconds), and only after something has already gone wrong.
    """
    import tifffile

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError:
        return None
    if magic[:2] not in (b"II", b"MM"):
        return None
    tiff_logger = logging.getLogger("tifffile")
    handler = _TiffLog()
    tiff_logger.addHandler(handler)
    propagate, tiff_logger.propagate = tiff_logger.propagate, False
    try:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c]
                if ends and max(ends) > size:
                    return (
                        f"image data of TIFF page {page.index} reaches byte {max(ends):,} but the file has "
                        f"{size:,} bytes"
                    )
    except Exception as exc:  # a directory offset past the end, or garbage where a directory should be
        return f"its TIFF directories cannot be read ({exc}); the file has {size:,} bytes"
    finally:
        tiff_logger.removeHandler(handler)
        tiff_logger.propagate = propagate
    offsets = [m for m in handler.messages if "offset" in m]
    if offsets:
        return f"a TIFF directory points past the end of the file ({offsets[0]}); the file has {size:,} bytes"
    return None


def _from_properties(props: dict[str, str]) -> tuple[float, float] | None:
    try:
        return float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y])
    except (KeyError, ValueError):
        return None


def tiff_resolution_mpp(path: str | Path) -> tuple[float, float] | None:
    """mpp from the first TIFF page's resolution tags, or None (not a TIFF, no tags, no physical unit)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tags = page.tags
            if "XResolution" not in tags or "YResolution" not in tags:
                return None
            unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2  # TIFF default: inch
            microns = {2: 25_400.0, 3: 10_000.0}.get(int(unit))
            if microns is None:
                return None
            mpps = []
            for name in ("XResolution", "YResolution"):
                num, den = tags[name].value
                if num <= 0 or den <= 0:
                    return None
                mpps.append(microns * den / num)
            return mpps[0], mpps[1]
    except Exception:  # not a TIFF, or unreadable tags: this source simply has no answer
        return None


def resolve_mpp(
    slide: openslide.OpenSlide,
    path: str | Path,
    slide_id: str,
    sheet_mpp: float | None = None,
    plausible: MppRange | None = None,
    *,
    mpp_cell: str = "",
) -> ResolvedMpp:
    """Level-0 mpp of ``slide`` by the policy in this module's docstring (``plausible``: the config's range,
    by default the schema's). ``mpp_cell``: where the slide's empty cell of the sheet's ``mpp`` column is (file,
    line), or "" when the sheet has no such column; it decides what the message says to do."""
    plausible = plausible or MppRange.from_config(default_config())
    warnings: list[str] = []
    if sheet_mpp is not None:
        if sheet_mpp not in plausible:
            raise SlideError(
                slide_id,
                f"the cohort sheet's mpp {sheet_mpp} is outside the plausible range [{plausible.min}, {plausible.max}]",
                fix="give level-0 µm/px (0.25 for 40x, 0.5 for 20x), or widen mpp.min/mpp.max in the config",
            )
        return ResolvedMpp(sheet_mpp, "sheet")

    props = dict(slide.properties)
    candidates = [  # asked in order, lazily: the TIFF tags are read only when the metadata has no answer
        ("openslide-metadata", lambda: _from_properties(props)),
        ("tiff-resolution", lambda: tiff_resolution_mpp(path)),
    ]
    for source, lookup in candidates:
        value = lookup()
        if value is None:
            continue
        mpp_x, mpp_y = value
        if not (math.isfinite(mpp_x) and math.isfinite(mpp_y)) or mpp_x not in plausible or mpp_y not in plausible:
            warnings.append(
                f"slide {slide_id!r}: ignoring {source} mpp {mpp_x:.4g} x {mpp_y:.4g} µm/px, outside the plausible "
                f"range [{plausible.min}, {plausible.max}] (often a default 72-dpi tag)"
            )
            continue
        if abs(mpp_x - mpp_y) > ANISOTROPY_TOLERANCE * max(mpp_x, mpp_y):
            warnings.append(
                f"slide {slide_id!r}: {source} mpp differs between x ({mpp_x}) and y ({mpp_y}); using x. "
                "Tiles are square in level-0 pixels."
            )
        return ResolvedMpp(mpp_x, source, tuple(warnings))

    power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    try:
        power_value = float(power) if power is not None else math.nan
    except ValueError:
        power_value = math.nan
    if math.isfinite(power_value) and power_value > 0 and (10.0 / power_value) in plausible:
        estimate = 10.0 / power_value
        warnings.append(
            f"slide {slide_id!r}: no mpp in the metadata; estimating {estimate:.3g} µm/px from objective power "
            f"{power_value:g}x. Scanners differ by up to ~10 %: " + sheet_mpp_fix(mpp_cell, "to be exact")
        )
        return ResolvedMpp(estimate, "objective-power-estimate", tuple(warnings))

    raise SlideError(
        slide_id,
        "has no usable microns-per-pixel (mpp): none in the OpenSlide metadata, the TIFF resolution tags or the "
        "objective power"
        + (", and its cell in the cohort sheet's 'mpp' column is empty" if mpp_cell else "")
        + (f" ({'; '.join(warnings)})" if warnings else ""),
        fix=sheet_mpp_fix(mpp_cell, "(e.g. 0.25 for 40x, 0.5 for 20x)"),
    )


def sheet_mpp_fix(mpp_cell: str, why: str = "") -> str:
    """How to give a slide's mpp in the cohort sheet: fill in its empty cell (``mpp_cell``: file, line, column)
    when the sheet has an ``mpp`` column, add the column when it has none."""
    what = "this slide's level-0 µm/px" + (f" {why}" if why else "")
    if mpp_cell:
        return f"fill in this slide's empty cell of the cohort sheet's 'mpp' column ({mpp_cell}) with {what}"
    return f"add an 'mpp' column to the cohort sheet with {what}"


def level_mpps(slide: openslide.OpenSlide, mpp: float) -> list[float]:
    return [mpp * d for d in slide.level_downsamples]


def read_level_for(slide: openslide.OpenSlide, mpp: float, target_mpp: float) -> int:
    """The coarsest pyramid level that is not coarser than ``target_mpp`` (then resized down to it).

    Reading level 0 of a 40x slide for 0.5 µm/px tiles would decode four times the pixels needed.
    """
    mpps = level_mpps(slide, mpp)
    fine_enough = [level for level, m in enumerate(mpps) if m <= target_mpp * (1 + LEVEL_TOLERANCE)]
    return max(fine_enough, key=lambda level: mpps[level]) if fine_enough else 0


def nearest_level(slide: openslide.OpenSlide, mpp: float, wanted_mpp: float) -> int:
    """The level whose mpp is nearest to ``wanted_mpp`` on a log scale; ties go to the coarser level."""
    distances = [(abs(math.log(m / wanted_mpp)), -m) for m in level_mpps(slide, mpp)]
    return min(range(len(distances)), key=lambda i: (round(distances[i][0], 6), distances[i][1]))


def read_rgb(slide: openslide.OpenSlide, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """``read_region`` as an RGB uint8 array, transparent (unscanned) pixels composited onto white."""
    region = slide.read_region(location, level, size)
    rgba = np.asarray(region)
    rgb = rgba[..., :3].copy()
    transparent = rgba[..., 3] == 0
    if transparent.any():
        rgb[transparent] = 255
    return rgb


def read_level_rgb(slide: openslide.OpenSlide, level: int, slide_id: str, path: str | Path | None = None) -> np.ndarray:
    """A whole pyramid level as RGB, for tissue detection and thumbnails; read errors name the slide (and say
    when the file is truncated, given its ``path``)."""
    try:
        return read_rgb(slide, (0, 0), level, slide.level_dimensions[level])
    except openslide.OpenSlideError as exc:
        truncated = tiff_truncation(path) if path is not None else None
        if truncated is not None:
            raise truncated_slide_error(slide_id, path, truncated) from exc
        raise SlideError(
            slide_id,
            f"pixel data cannot be decoded at level {level}: {exc}",
            fix="the file is corrupt or truncated; re-export or re-scan it, or remove it from the sheet",
        ) from exc


def undecodable_tile_error(
    slide_id: str,
    x: int,
    y: int,
    level: int,
    exc: Exception,
    fix: str = "the slide file is corrupt; re-export or re-scan it, or remove it from the sheet",
) -> SlideError:
    """The error for one tile OpenSlide could not decode, as every stage that reads tiles reports it."""
    return SlideError(slide_id, f"tile at level-0 x={x}, y={y} (level {level}) cannot be decoded: {exc}", fix=fix)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average resize to ``size`` = (width, height)."""
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def check_target(mpp: float, target_mpp: float, slide_id: str) -> list[str]:
    """Warnings about a target resolution finer than the slide was scanned at (tiles get upsampled)."""
    if target_mpp < mpp * (1 - LEVEL_TOLERANCE):
        return [
            f"slide {slide_id!r}: target {target_mpp} µm/px is finer than level 0 ({mpp:.4g} µm/px); "
            "tiles are upsampled and carry no extra detail"
        ]
    return []
