"""OpenSlide, the first reader tried: Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura, Ventana, Zeiss (some),
DICOM with ImageType, and tiled pyramidal TIFFs.

What it reads is byte-identical to ``openslide.OpenSlide.read_region`` composited onto white, as before readers
existed; two things make it cheaper:

- JPEG-tiled TIFF pyramids (``generic-tiff``, ``aperio``) are read at whole pixels by decoding the stored tiles
  directly, after a per-level check that this gives OpenSlide's bytes (:mod:`.tiff_tiles`, which says why);
- every other read calls OpenSlide's C ``read_region`` into a NumPy buffer and takes RGB straight from its
  premultiplied ARGB where the region is opaque (no PIL image, no RGBA copy, no per-pixel alpha fix-up); regions
  with transparent pixels go through openslide-python's own conversion, as before.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openslide
import openslide.lowlevel as lowlevel

from histoclip.tiling.readers.base import ReadError
from histoclip.tiling.readers.tiff_tiles import TiffTileDecoder, Unserved

#: openslide-python's raw binding of ``openslide_read_region`` (None where a version lacks it: then the public
#: ``read_region`` is used).
_RAW_READ_REGION = getattr(lowlevel, "_read_region", None) if sys.byteorder == "little" else None


def level_pixel(location: tuple[int, int], downsample: float) -> tuple[int, int] | None:
    """The pixel of a level (``downsample`` of level 0) where a read at level-0 ``location`` starts, or None when
    it falls between pixels (OpenSlide then resamples the region)."""
    px, py = location[0] / downsample, location[1] / downsample
    if px != int(px) or py != int(py):
        return None
    return int(px), int(py)


class OpenSlideReader:
    name = "openslide"
    mpp_source = "openslide-metadata"

    def __init__(self, path: str | Path, direct_tiles: bool = True) -> None:
        self._path = str(path)
        self._slide = openslide.OpenSlide(self._path)
        self.vendor = self._slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        # read once: after a failed read an OpenSlide handle raises its error from every call, these included
        self._level_dimensions = self._slide.level_dimensions
        self._level_downsamples = self._slide.level_downsamples
        #: whether JPEG-tiled TIFF levels may be decoded directly (False: every read is OpenSlide's)
        self.direct_tiles = direct_tiles
        self._decoder: TiffTileDecoder | None = None
        self._decoder_opened = False
        self._direct_levels: dict[int, bool] = {}

    @property
    def level_count(self) -> int:
        return len(self._level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._level_dimensions[0]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples

    @property
    def properties(self) -> Mapping[str, str]:
        return self._slide.properties

    def metadata_mpp(self) -> tuple[float, float] | None:
        props = self._slide.properties
        try:
            return float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y])
        except (KeyError, ValueError):
            return None

    def objective_power(self) -> float | None:
        try:
            return float(self._slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER])
        except (KeyError, ValueError):
            return None

    def tile_size(self, level: int) -> tuple[int, int] | None:
        props = self._slide.properties
        try:
            return int(props[f"openslide.level[{level}].tile-width"]), int(
                props[f"openslide.level[{level}].tile-height"]
            )
        except (KeyError, ValueError):
            return None

    def pixel_origin(self, location: tuple[int, int], level: int) -> tuple[int, int] | None:
        return level_pixel(location, self._level_downsamples[level])

    @property
    def direct_levels(self) -> dict[int, bool]:
        """Levels checked so far, and whether their reads are decoded directly (the benchmark and tests ask)."""
        return dict(self._direct_levels)

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        origin = self.pixel_origin(location, level)
        if origin is not None and self._direct(level):
            try:
                return self._decoder.read(level, origin[0], origin[1], int(size[0]), int(size[1]))
            except Unserved:
                pass  # OpenSlide reads it (and raises its own error if the data is bad)
        return self._read_region_rgb(location, level, size)

    def read_level_rgb(self, level: int) -> np.ndarray:
        return self.read_rgb((0, 0), level, self._level_dimensions[level])

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self._slide.close()

    def __enter__(self) -> OpenSlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the two ways of reading ---------------------------------------------------------------------------------
    def _direct(self, level: int) -> bool:
        """Whether ``level`` is read by decoding its stored tiles: checked once per level (module docstring)."""
        known = self._direct_levels.get(level)
        if known is not None:
            return known
        ok = False
        if self.direct_tiles:
            if not self._decoder_opened:
                self._decoder_opened = True
                self._decoder = TiffTileDecoder.open(self._path, self.vendor, self._level_dimensions)
            if self._decoder is not None and self._decoder.serves(level):
                ok = self._agrees_with_openslide(level)
        self._direct_levels[level] = ok
        return ok

    def _agrees_with_openslide(self, level: int) -> bool:
        x, y, width, height = self._decoder.largest_tile(level)
        downsample = self._level_downsamples[level]
        location = (round(x * downsample), round(y * downsample))
        if level_pixel(location, downsample) != (x, y):
            return False
        try:
            direct = self._decoder.read(level, x, y, width, height)
            reference = self._read_region_rgb(location, level, (width, height))
        except (Unserved, ReadError):
            return False
        return bool(np.array_equal(direct, reference))

    def _read_region_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """OpenSlide's ``read_region`` composited onto white, as RGB uint8."""
        width, height = int(size[0]), int(size[1])
        if _RAW_READ_REGION is None or width <= 0 or height <= 0:
            return self._read_region_pil(location, level, size)
        argb = np.empty((height, width), np.uint32)
        try:
            _RAW_READ_REGION(
                self._slide._osr,
                argb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
                int(location[0]),
                int(location[1]),
                level,
                width,
                height,
            )
        except openslide.OpenSlideError as exc:
            raise ReadError(str(exc)) from exc
        bgra = argb.view(np.uint8).reshape(height, width, 4)  # premultiplied ARGB, little-endian: B, G, R, A
        alpha = bgra[..., 3]
        if alpha.min() == 255:  # opaque: premultiplied values are the colours
            return np.ascontiguousarray(bgra[..., 2::-1])
        lowlevel._convert.argb2rgba(argb)  # openslide-python's own un-premultiplication, in place
        rgba = argb.view(np.uint8).reshape(height, width, 4)
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255
        return rgb

    def _read_region_pil(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            region = self._slide.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            raise ReadError(str(exc)) from exc
        rgba = np.asarray(region)
        rgb = rgba[..., :3].copy()
        transparent = rgba[..., 3] == 0
        if transparent.any():
            rgb[transparent] = 255
        return rgb
