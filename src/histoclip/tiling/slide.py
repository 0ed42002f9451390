"""Opening whole-slide images and the microns-per-pixel policy.

The physical resolution of level 0 (``mpp``, µm per pixel) decides what every tile means: get it wrong
and a "20x" tile is really 10x or 40x and every downstream number is silently off. So it is resolved in a
fixed order, each answer recorded with its source:

1. ``sheet``: the cohort sheet's ``mpp`` column (the user knows best);
2. the reader's own metadata, named after it: ``openslide-metadata`` (OpenSlide's ``openslide.mpp-x`` / ``-y``),
   ``dicom-metadata`` (PixelSpacing), ``ome-metadata`` (OME PhysicalSizeX/Y), ``czi-metadata`` (CZI scaling);
3. ``tiff-resolution``: the TIFF XResolution/YResolution tags of the first page (cm or inch units);
4. ``objective-power-estimate``: 10 / objective power (20x → 0.5), a rough estimate, with a warning.

Slides are opened by :func:`open_wsi` through the readers of :mod:`histoclip.tiling.readers` (OpenSlide first).

Metadata values outside a plausible range (e.g. 352.78 µm/px, a 72-dpi default that TIFF writers put in)
are ignored with a warning. If nothing usable remains, the slide fails with a message that says to add an
``mpp`` value to the sheet.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import openslide
from PIL import Image

from histoclip.config import SectionSettings, default_config
from histoclip.errors import SlideError
from histoclip.tiling import readers
from histoclip.tiling.readers import ReadError, SlideReader

log = logging.getLogger(__name__)

#: Relative tolerance when comparing a level's mpp with a target: vendors store downsamples like 4.0004.
LEVEL_TOLERANCE = 0.01
#: Two mpp values closer than this (relative) are the same resolution.
ANISOTROPY_TOLERANCE = 0.02

MPP_SOURCES = (
    "sheet",
    "openslide-metadata",
    "dicom-metadata",
    "ome-metadata",
    "czi-metadata",
    "tiff-resolution",
    "objective-power-estimate",
)


#: How the mpp error names the metadata each reader looked in.
METADATA_NAMES = {
    "openslide": "OpenSlide",
    "wsidicom": "DICOM",
    "pydicom-frames": "DICOM",
    "tifffile": "OME",
    "pylibczirw": "CZI",
}


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


def open_wsi(path: str | Path, slide_id: str) -> SlideReader:
    """Open ``path`` with the first reader that reads it (:mod:`histoclip.tiling.readers`: OpenSlide first), or
    raise a :class:`SlideError` naming the slide and saying what the file really is.

    ``openslide.open_slide`` is deliberately not used: it falls back to PIL for plain images, which would
    load a whole "slide" into memory and hide that the file is not a pyramid.
    """
    from histoclip.tiling.readers.openslide_reader import OpenSlideReader

    path = Path(path)
    if not path.exists():
        raise SlideError(slide_id, f"file {str(path)!r} does not exist", fix="correct the path in the cohort sheet")
    if path.is_dir():
        raise SlideError(
            slide_id,
            f"{str(path)!r} is a folder, not a slide file",
            fix="point the sheet's path at the slide file (for a DICOM series: any one of its .dcm files)",
        )
    kind = readers.sniff(path)
    if kind.family == "empty":
        not_an_image(slide_id, path, kind)
    try:
        return OpenSlideReader(path)
    except (openslide.OpenSlideError, OSError) as exc:
        openslide_error: Exception = exc
    truncated = tiff_truncation(path)
    if truncated is not None:
        raise truncated_slide_error(slide_id, path, truncated) from openslide_error
    reasons = [f"OpenSlide: {openslide_error or 'unsupported format'}"]
    for reader in readers.candidates(kind):
        try:
            return reader(path)
        except readers.NotBrightfield as exc:
            raise not_brightfield_error(slide_id, path, kind, exc) from exc
        except readers.Truncated as exc:
            raise truncated_slide_error(slide_id, path, str(exc)) from exc
        except Exception as exc:  # ReaderRefused, or anything a damaged file makes a reader throw
            reasons.append(str(exc) if isinstance(exc, readers.ReaderRefused) else f"{reader.name}: {exc}")
    raise unreadable_error(slide_id, path, kind, reasons) from openslide_error


def not_an_image(slide_id: str, path: Path, kind: readers.FileKind) -> NoReturn:
    """Raise the error for a file that is no image at all (text, an HTML page, a Git LFS pointer, empty)."""
    if kind.family == "empty":
        raise SlideError(
            slide_id,
            f"{str(path)!r} is not an image at all: it is empty (0 bytes)",
            fix="copy the slide again from its source and check its size",
        )
    what, fix = readers.text_kind(kind.head)
    first = kind.head.decode("utf-8", errors="replace").strip().splitlines()[0][:60] if kind.head.strip() else ""
    raise SlideError(slide_id, f"{str(path)!r} is not an image at all: it is {what}, beginning {first!r}", fix=fix)


def not_brightfield_error(slide_id: str, path: Path, kind: readers.FileKind, exc: readers.NotBrightfield) -> SlideError:
    return SlideError(
        slide_id,
        f"{str(path)!r} is not a brightfield slide: this workflow reads brightfield RGB slides; {exc}",
        fix="remove it from the cohort sheet (fluorescence and multiplex images need models made for them); if "
        "it should be an H&E or IHC scan, export the brightfield scan instead (8-bit RGB)",
    )


def unreadable_error(slide_id: str, path: Path, kind: readers.FileKind, reasons: list[str]) -> SlideError:
    """What is said when no reader opens a file that is an image of some kind."""
    why = "; ".join(reasons)
    if kind.family == "text":
        not_an_image(slide_id, path, kind)
    if kind.family == "image":
        return SlideError(
            slide_id,
            f"{str(path)!r} is a {kind.label}, not a whole-slide format (no pyramid, no scan resolution)",
            fix=f"convert it to a pyramidal tiled TIFF with `histoclip convert {path} {path.with_suffix('.tiff')} "
            "--mpp MPP` (MPP: its µm per pixel) and point the sheet at the new file",
        )
    if kind.family in ("tiff", "dicom", "czi"):
        return SlideError(
            slide_id,
            f"{str(path)!r} is a {kind.label} file that no reader can open: it is damaged, or uses an encoding "
            f"none of them decodes ({why})",
            fix="the file is damaged or unusually encoded; re-export or re-scan it, or remove it from the sheet",
        )
    return SlideError(
        slide_id,
        f"{str(path)!r} is a {kind.label}, not a slide format any reader here opens ({why})",
        fix="export the slide from the scanner's software as DICOM, OME-TIFF or a tiled pyramidal TIFF, or "
        "remove it from the sheet",
    )


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
    slide: SlideReader,
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

    candidates = [  # asked in order, lazily: the TIFF tags are read only when the reader's metadata has no answer
        (slide.mpp_source, slide.metadata_mpp),
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

    power = slide.objective_power()
    power_value = math.nan if power is None else power
    if math.isfinite(power_value) and power_value > 0 and (10.0 / power_value) in plausible:
        estimate = 10.0 / power_value
        warnings.append(
            f"slide {slide_id!r}: no mpp in the metadata; estimating {estimate:.3g} µm/px from objective power "
            f"{power_value:g}x. Scanners differ by up to ~10 %: " + sheet_mpp_fix(mpp_cell, "to be exact")
        )
        return ResolvedMpp(estimate, "objective-power-estimate", tuple(warnings))

    raise SlideError(
        slide_id,
        f"has no usable microns-per-pixel (mpp): none in the {METADATA_NAMES.get(slide.name, slide.name)} metadata, "
        "the TIFF resolution tags or the objective power"
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


def level_mpps(slide: SlideReader, mpp: float) -> list[float]:
    return [mpp * d for d in slide.level_downsamples]


def read_level_for(slide: SlideReader, mpp: float, target_mpp: float) -> int:
    """The coarsest pyramid level that is not coarser than ``target_mpp`` (then resized down to it).

    Reading level 0 of a 40x slide for 0.5 µm/px tiles would decode four times the pixels needed.
    """
    mpps = level_mpps(slide, mpp)
    fine_enough = [level for level, m in enumerate(mpps) if m <= target_mpp * (1 + LEVEL_TOLERANCE)]
    return max(fine_enough, key=lambda level: mpps[level]) if fine_enough else 0


def nearest_level(slide: SlideReader, mpp: float, wanted_mpp: float) -> int:
    """The level whose mpp is nearest to ``wanted_mpp`` on a log scale; ties go to the coarser level."""
    distances = [(abs(math.log(m / wanted_mpp)), -m) for m in level_mpps(slide, mpp)]
    return min(range(len(distances)), key=lambda i: (round(distances[i][0], 6), distances[i][1]))


def read_rgb(slide: SlideReader, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 region (``location`` in level-0 pixels, ``size`` at ``level``), unscanned pixels white; raises
    :class:`~histoclip.tiling.readers.ReadError` for data that cannot be decoded."""
    return slide.read_rgb(location, level, size)


def read_level_rgb(slide: SlideReader, level: int, slide_id: str, path: str | Path | None = None) -> np.ndarray:
    """A whole pyramid level as RGB, for tissue detection and thumbnails; read errors name the slide (and say
    when the file is truncated, given its ``path``)."""
    try:
        return slide.read_level_rgb(level)
    except ReadError as exc:
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
