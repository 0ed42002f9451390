"""Each slide opened, its mpp resolved, and two tiles decoded where tiling and tissue detection will read.

The levels and tile sizes are those of the run itself (:mod:`histoclip.tiling.slide`, :mod:`histoclip.tiling.grid`),
so the preflight reads what the run will read.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoclip.errors import SlideError
from histoclip.preflight.problems import Problem
from histoclip.sheets import SlideRecord
from histoclip.tiling import grid
from histoclip.tiling import slide as wsi
from histoclip.tiling.roi import read_slide_roi

#: Columns of the per-slide table.
SLIDE_COLUMNS = (
    "slide_id",
    "status",
    "path",
    "vendor",
    "reader",
    "level_count",
    "level0_width",
    "level0_height",
    "level0_mpp",
    "mpp_source",
    "read_level",
    "tissue_level",
    "tissue_level_mb",
    "seconds",
)
#: A level read whole (tissue detection) larger than this (RGBA bytes) is worth a warning about memory.
LARGE_LEVEL_BYTES = 256 * 2**20


@dataclass(frozen=True)
class SlideSettings:
    """What the run will do to each slide, from the validated config (the tile rule's own settings)."""

    tiling: grid.TilingParams
    tissue_mpp: float
    plausible: wsi.MppRange
    on_slide_error: str
    roi_classes: tuple[str, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SlideSettings:
        return cls(
            tiling=grid.TilingParams.from_config(config),
            tissue_mpp=float(config["tissue"]["mpp"]),
            plausible=wsi.MppRange.from_config(config),
            on_slide_error=str(config["on_slide_error"]),
            roi_classes=tuple(config["tiling"]["roi_classes"]),
        )

    @property
    def slide_severity(self) -> str:
        return "skip" if self.on_slide_error == "record" else "error"


@dataclass
class SlideCheck:
    """What the preflight learnt about one slide (a row of the per-slide table)."""

    slide_id: str
    path: str
    status: str = "ok"
    vendor: str = ""
    reader: str = ""
    level_count: int = 0
    level0_width: int = 0
    level0_height: int = 0
    level0_mpp: float = math.nan
    mpp_source: str = ""
    read_level: int = -1
    tissue_level: int = -1
    tissue_level_mb: float = math.nan
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)


def _read_region(slide: Any, slide_id: str, path: Path, level: int, location: tuple[int, int], size: int) -> None:
    """Decode one region; a failure becomes a SlideError that says truncated or corrupt."""
    try:
        wsi.read_rgb(slide, location, level, (size, size))
    except wsi.ReadError as exc:
        truncated = wsi.tiff_truncation(path)
        if truncated is not None:
            raise wsi.truncated_slide_error(slide_id, path, truncated) from exc
        raise SlideError(
            slide_id,
            f"pixel data at level {level}, level-0 x={location[0]}, y={location[1]} cannot be decoded: {exc}",
            fix="the file is corrupt; re-export or re-scan it, or remove it from the sheet",
        ) from exc


def _one_stored_tile(slide: Any, level: int, location: tuple[int, int], size: int) -> tuple[tuple[int, int], int]:
    """Move a region onto the file's own tile grid (when the reader reports it) and fit it in one stored tile, so
    that checking it costs one decode, not up to four."""
    downsample = slide.level_downsamples[level]
    width, height = slide.level_dimensions[level]
    tile_w, tile_h = slide.tile_size(level) or (size, size)
    x = min(max(0, int(location[0] / downsample)), max(0, width - 1))
    y = min(max(0, int(location[1] / downsample)), max(0, height - 1))
    x, y = x - x % tile_w, y - y % tile_h
    size = max(1, min(size, tile_w, tile_h, width - x, height - y))
    return (round(x * downsample), round(y * downsample)), size


def check_slide(record: SlideRecord, settings: SlideSettings) -> SlideCheck:
    """Open one slide, resolve its mpp, size the level tissue detection reads, and decode two tiles.

    Every problem is recorded on the returned :class:`SlideCheck`, never raised: one odd file must not stop the
    check of the thousands after it.
    """
    try:
        return _check_slide(record, settings)
    except Exception as exc:  # anything OpenSlide or a vendor format throws that the checks above don't name
        check = SlideCheck(record.slide_id, str(record.path), status=settings.slide_severity)
        problem = f"could not be checked: {type(exc).__name__}: {exc}"
        fix = "open the file by hand (OpenSlide, tifffile or pydicom) to see what is wrong, or remove it from the sheet"
        where = f"slide {record.slide_id!r} ({record.path})"
        check.problems.append(Problem(settings.slide_severity, "slide", where, problem, fix, record.slide_id))
        return check


def _check_slide(record: SlideRecord, settings: SlideSettings) -> SlideCheck:
    started = time.perf_counter()
    check = SlideCheck(record.slide_id, str(record.path))
    where = f"slide {record.slide_id!r} ({record.path})"

    def add(severity: str, problem: str, fix: str = "") -> None:
        check.problems.append(Problem(severity, "slide", where, problem, fix, record.slide_id))

    def failed(error: SlideError) -> SlideCheck:
        check.status = settings.slide_severity
        fix = error.fix or ""
        if settings.on_slide_error == "record":
            fix = grid.on_slide_error_fix(fix, "record").strip()
        add(settings.slide_severity, error.problem, fix)
        check.seconds = time.perf_counter() - started
        return check

    try:
        slide = wsi.open_wsi(record.path, record.slide_id)
    except SlideError as exc:
        return failed(exc)
    with slide:
        check.vendor = slide.vendor
        check.reader = slide.name
        check.level_count = slide.level_count
        check.level0_width, check.level0_height = slide.dimensions
        try:
            resolved = wsi.resolve_mpp(
                slide, record.path, record.slide_id, record.mpp, settings.plausible, mpp_cell=record.mpp_cell
            )
        except SlideError as exc:
            return failed(exc)
        check.level0_mpp, check.mpp_source = resolved.mpp, resolved.source
        for warning in resolved.warnings:
            fix = wsi.sheet_mpp_fix(record.mpp_cell) if "objective power" in warning else ""
            add("warning", warning, fix)
        for warning in wsi.check_target(resolved.mpp, settings.tiling.target_mpp, record.slide_id):
            add("warning", warning, "accept upsampled tiles, or set tiling.target_mpp to at least the scan's mpp")

        tissue_level = wsi.nearest_level(slide, resolved.mpp, settings.tissue_mpp)
        width, height = slide.level_dimensions[tissue_level]
        check.tissue_level = tissue_level
        check.tissue_level_mb = width * height * 4 / 2**20
        if width * height * 4 > LARGE_LEVEL_BYTES:
            pyramid = "has no pyramid" if slide.level_count == 1 else "has no pyramid level near tissue.mpp"
            add(
                "warning",
                f"{pyramid} ({settings.tissue_mpp} µm/px): tissue detection reads level {tissue_level} whole "
                f"({width}×{height} px, {width * height * 4 / 2**30:.1f} GiB in memory)",
                f"convert it to a pyramidal tiled TIFF (histoclip convert {record.path} "
                f"{Path(record.path).with_suffix('.pyramid.tiff')}) or give the tile rule more memory "
                "(resources: mem_mb)",
            )

        read_level = wsi.read_level_for(slide, resolved.mpp, settings.tiling.target_mpp)
        check.read_level = read_level
        tile_level0 = grid.tile_level0_px(settings.tiling, resolved.mpp)
        read_px = grid.read_tile_px(tile_level0, slide.level_downsamples[read_level])
        centre = ((check.level0_width - tile_level0) // 2, (check.level0_height - tile_level0) // 2)
        try:  # a tile where tiling's tiles are read, and one of the level tissue detection reads whole
            reads = [(read_level, centre, read_px)]
            if tissue_level != read_level:
                reads.append((tissue_level, (0, 0), 256))
            for level, location, size in reads:
                location, size = _one_stored_tile(slide, level, location, size)
                _read_region(slide, record.slide_id, record.path, level, location, size)
        except SlideError as exc:
            return failed(exc)
        # after the reads, as tiling does: a damaged file is said to be damaged first
        too_small = grid.too_small_error(record.slide_id, slide.dimensions, resolved.mpp, settings.tiling)
        if too_small is not None:
            return failed(too_small)
        if record.roi is not None:
            try:
                roi = read_slide_roi(record.roi, settings.roi_classes, record.slide_id)
            except SlideError as exc:
                return failed(exc)
            x0, y0, x1, y1 = roi.bounds()
            width, height = slide.dimensions
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                return failed(
                    SlideError(
                        record.slide_id,
                        f"the regions of its ROI file {str(record.roi)!r} (x {x0:.0f}–{x1:.0f}, y {y0:.0f}–{y1:.0f} "
                        f"level-0 px) lie outside the slide ({width}×{height} px)",
                        fix="export the annotations of this slide (QuPath exports level-0 pixel coordinates), or "
                        "correct the sheet's roi column",
                    )
                )
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                add(
                    "warning",
                    f"part of the regions of its ROI file {str(record.roi)!r} lies outside the slide ({width}×{height} "
                    "px): only the part inside is tiled",
                    "check that the file belongs to this slide",
                )
    check.seconds = time.perf_counter() - started
    return check


def check_slides(
    records: Sequence[SlideRecord], settings: SlideSettings, threads: int | None = None
) -> list[SlideCheck]:
    """:func:`check_slide` for every record, in sheet order, on ``threads`` threads (OpenSlide's C calls
    release the GIL, so threads overlap the file reads and decoding)."""
    threads = max(1, threads or os.cpu_count() or 1)
    if threads == 1 or len(records) < 2:
        return [check_slide(record, settings) for record in records]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda record: check_slide(record, settings), records))
