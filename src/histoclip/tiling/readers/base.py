"""What every slide reader offers, and the shared machinery of the readers that are not OpenSlide.

The workflow reads slides through one small surface (:class:`SlideReader`): the pyramid's geometry, the metadata
the mpp policy asks for, RGB regions at a level, a whole level for tissue detection, and ``close``. OpenSlide
provides all of it natively; for files it rejects, :class:`RegionReader` turns a format's "decode this rectangle
of this stored level" into the same surface, adding what OpenSlide would have given:

- regions are addressed like ``openslide.OpenSlide.read_region``: ``location`` in level-0 pixels, ``size`` at the
  level; whatever lies outside the image is white (OpenSlide's transparent pixels, composited onto white);
- **virtual levels**: a slide stored without a pyramid (a stripped TIFF, a single DICOM instance) still gets
  coarser levels, each read by area-averaging a finer stored level, so tissue detection never needs level 0
  whole. Whole levels are read in bands of rows (:data:`BAND_BYTES`), so memory stays bounded by the band and
  the output, not by the slide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

#: The longest side of the coarsest virtual level: virtual levels are added (halving) until a level fits.
VIRTUAL_LEVEL_MAX_PX = 1024
#: A whole level is decoded in bands of at most this many bytes of the level it is averaged from.
BAND_BYTES = 16 * 2**20


class ReadError(Exception):
    """Pixel data that cannot be decoded (corrupt data, a truncated file). Readers raise it from every read, so
    callers catch one exception type whatever read the file."""


class ReaderRefused(Exception):
    """This reader does not read this file; the message says why (kept for the diagnosis if no reader does)."""


class Truncated(ReaderRefused):
    """The file is of this reader's format but ends early (an interrupted copy); the message says where."""


class NotBrightfield(ReaderRefused):
    """The file is an image this reader understands, but not a brightfield RGB slide (fluorescence, multiplex,
    grayscale): no other reader or conversion makes it one, so the search stops here."""

    def __init__(self, channels: int, dtype: str, what: str = "") -> None:
        self.channels = channels
        self.dtype = dtype
        self.what = what
        noun = "channel" if channels == 1 else "channels"
        super().__init__(f"found {channels} {noun} of {dtype}" + (f" ({what})" if what else ""))


@runtime_checkable
class SlideReader(Protocol):
    """The slide surface every stage uses (tiling, preflight, QC, embedding, evidence, training)."""

    #: Which reader opened the file ("openslide", "wsidicom", "pydicom-frames", "tifffile", "pylibczirw").
    name: str
    #: What the file is, in OpenSlide's vocabulary where it has one ("aperio", "generic-tiff", "dicom", "ome-tiff").
    vendor: str
    #: Where :meth:`metadata_mpp` comes from, as the mpp policy records it ("openslide-metadata", "dicom-metadata").
    mpp_source: str

    @property
    def level_count(self) -> int: ...

    @property
    def dimensions(self) -> tuple[int, int]: ...

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...

    @property
    def properties(self) -> Mapping[str, str]: ...

    def metadata_mpp(self) -> tuple[float, float] | None:
        """Level-0 (x, y) µm per pixel from the file's own metadata, or None."""
        ...

    def objective_power(self) -> float | None: ...

    def tile_size(self, level: int) -> tuple[int, int] | None:
        """The stored tile (or strip) size at ``level``: a read aligned to it decodes one segment."""
        ...

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (height, width, 3) of ``size`` at ``level``, top-left at level-0 ``location``; raises
        :class:`ReadError` when the data cannot be decoded. A reader reads a large region (a block of many grid
        tiles: :mod:`histoclip.tiling.blocks`) however suits its format, decoding each stored tile once."""
        ...

    def pixel_origin(self, location: tuple[int, int], level: int) -> tuple[int, int] | None:
        """The pixel of ``level`` at which :meth:`read_rgb` of level-0 ``location`` starts, or None when the read is
        resampled between pixels. Where it is not None, a region cut from a larger read at the same level is the
        same bytes as reading the region itself (what block reads rely on)."""
        ...

    def read_level_rgb(self, level: int) -> np.ndarray:
        """A whole level as RGB (tissue detection, thumbnails); raises :class:`ReadError`."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> SlideReader: ...

    def __exit__(self, *exc: object) -> None: ...


@dataclass(frozen=True)
class Level:
    """A level as a reader stores it (``factor`` 1) or as a virtual level averaged from ``source`` by ``factor``."""

    width: int
    height: int
    downsample: float
    source: int  # index of the stored level read
    factor: int  # area-average factor applied to what ``source`` returns


def add_virtual_levels(stored: list[Level], max_px: int = VIRTUAL_LEVEL_MAX_PX) -> list[Level]:
    """``stored`` plus halving levels below its coarsest one until the longest side is at most ``max_px``."""
    levels = list(stored)
    coarsest = len(stored) - 1
    base = stored[coarsest]
    factor = 1
    while max(levels[-1].width, levels[-1].height) > max_px:
        factor *= 2
        width, height = max(1, base.width // factor), max(1, base.height // factor)
        if (width, height) == (levels[-1].width, levels[-1].height):
            break
        levels.append(Level(width, height, base.downsample * factor, coarsest, factor))
    return levels


def area_average(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor`` × ``factor`` block (the array is cropped to whole blocks), rounded like PIL's BOX."""
    if factor == 1:
        return rgb
    h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
    blocks = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
    total = blocks.sum(axis=(1, 3), dtype=np.uint32)  # summed in place of a widened copy of the block
    return ((total + factor * factor // 2) // (factor * factor)).astype(np.uint8)


class RegionReader:
    """Base of the readers that are not OpenSlide: subclasses fill ``_levels`` (stored levels first, then
    :func:`add_virtual_levels`) and implement :meth:`_read_stored`."""

    name = "region"
    vendor = "unknown"
    mpp_source = "metadata"

    def __init__(self) -> None:
        self._levels: list[Level] = []
        self._properties: dict[str, str] = {}

    # -- what subclasses provide --------------------------------------------------------------------------------
    def _read_stored(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 of a rectangle inside stored level ``level`` (coordinates at that level)."""
        raise NotImplementedError

    def metadata_mpp(self) -> tuple[float, float] | None:
        return None

    def objective_power(self) -> float | None:
        return None

    def tile_size(self, level: int) -> tuple[int, int] | None:
        return None

    def close(self) -> None:
        """Release the file (subclasses close their handles)."""

    # -- the SlideReader surface --------------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._levels[0].width, self._levels[0].height

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((level.width, level.height) for level in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(level.downsample for level in self._levels)

    @property
    def properties(self) -> Mapping[str, str]:
        return self._properties

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = self.pixel_origin(location, level)
        return self._read_level_rect(level, x, y, int(size[0]), int(size[1]))

    def pixel_origin(self, location: tuple[int, int], level: int) -> tuple[int, int]:
        """Regions start at the level pixel that holds ``location`` (never resampled)."""
        spec = self._levels[level]
        return math.floor(location[0] / spec.downsample), math.floor(location[1] / spec.downsample)

    def read_level_rgb(self, level: int) -> np.ndarray:
        spec = self._levels[level]
        return self._read_level_rect(level, 0, 0, spec.width, spec.height)

    def __enter__(self) -> RegionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------------------------------
    def _read_level_rect(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """A rectangle at ``level`` (its own coordinates), white outside the image, via the stored level, decoded
        in bands of rows so that no more than :data:`BAND_BYTES` of the stored level is held at once."""
        spec = self._levels[level]
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(spec.width, x + width), min(spec.height, y + height)
        if x1 <= x0 or y1 <= y0:
            return out
        f = spec.factor
        band_rows = max(1, BAND_BYTES // max(1, (x1 - x0) * 3 * f * f))
        for top in range(y0, y1, band_rows):
            bottom = min(y1, top + band_rows)
            out[top - y : bottom - y, x0 - x : x1 - x] = self._averaged(spec, x0, top, x1, bottom)
        return out

    def _averaged(self, spec: Level, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of a level that lie inside it: read from its stored level, averaged by its factor."""
        f = spec.factor
        source = self._levels[spec.source]
        sx0, sy0 = x0 * f, y0 * f
        sx1, sy1 = min(source.width, x1 * f), min(source.height, y1 * f)
        stored = self._read_stored(spec.source, sx0, sy0, sx1 - sx0, sy1 - sy0)
        if f > 1:  # pad a ragged last block with its edge pixels so every output pixel is a full average
            want_h, want_w = (y1 - y0) * f, (x1 - x0) * f
            if stored.shape[0] < want_h or stored.shape[1] < want_w:
                stored = np.pad(
                    stored, ((0, want_h - stored.shape[0]), (0, want_w - stored.shape[1]), (0, 0)), mode="edge"
                )
            stored = area_average(stored, f)
        return stored[: y1 - y0, : x1 - x0]
