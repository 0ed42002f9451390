"""``histoclip convert IN OUT.tiff``: any slide the readers open (or a plain PNG/JPEG image) rewritten as a
pyramidal, JPEG-tiled TIFF that OpenSlide reads as ``generic-tiff``, with its mpp kept.

Why: a format no reader here opens well (a plain image, a compressed single-strip TIFF whose every read decodes
the whole image) becomes the layout every stage reads fastest, using only what the project installs (tifffile,
imagecodecs). The pyramid is written as successive pages (OpenSlide does not see SubIFDs), downsamples 1, 4,
16, ... until a level fits in :data:`COARSEST_PX`; each page's resolution tags carry its own µm per pixel.

Memory stays bounded: each level is written from a generator of tiles, made one row of tiles at a time from the
finest source level not coarser than the level (read in bands by the readers themselves). A plain PNG or JPEG
is the exception: Pillow decodes it whole, as it must.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from histoclip.errors import SlideError
from histoclip.store import atomic_path
from histoclip.tiling import readers
from histoclip.tiling import slide as wsi
from histoclip.tiling.readers.base import Level, RegionReader, add_virtual_levels

#: The pyramid ends with the first level whose longest side is at most this.
COARSEST_PX = 1024
#: Each level is this many times smaller than the one before (OpenSlide's usual step).
LEVEL_STEP = 4


class PlainImageReader(RegionReader):
    """A PNG/JPEG/BMP/GIF held in memory, behind the reader surface, so convert treats it like any slide."""

    name = "pillow"
    vendor = "plain-image"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        with Image.open(path) as image:
            self._rgb = np.asarray(image.convert("RGB"))
        height, width = self._rgb.shape[:2]
        self._levels = add_virtual_levels([Level(width, height, 1.0, 0, 1)])

    def _read_stored(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._rgb[y : y + height, x : x + width]


@dataclass(frozen=True)
class Converted:
    """What was written: the file, its levels (width, height), level-0 mpp and where that came from."""

    path: Path
    reader: str
    levels: tuple[tuple[int, int], ...]
    mpp: float | None
    mpp_source: str

    def describe(self) -> str:
        sizes = ", ".join(f"{w}×{h}" for w, h in self.levels)
        mpp = f"{self.mpp:.4g} µm/px ({self.mpp_source})" if self.mpp else "no mpp (give one with --mpp)"
        return f"wrote {self.path}: {len(self.levels)} levels ({sizes}), {mpp}, read with {self.reader}"


def open_source(path: str | Path, slide_id: str) -> readers.SlideReader:
    """The input as a reader: a plain image through Pillow, anything else through :func:`wsi.open_wsi`."""
    path = Path(path)
    if path.is_file() and readers.sniff(path).family == "image":
        try:
            return PlainImageReader(path)
        except Exception as exc:  # Pillow's own word for a damaged or oversized image
            raise SlideError(slide_id, f"{str(path)!r} cannot be read by Pillow: {exc}") from exc
    return wsi.open_wsi(path, slide_id)


def level_sizes(width: int, height: int) -> list[tuple[int, int, int]]:
    """(downsample, width, height) of each level to write."""
    levels = [(1, width, height)]
    while max(levels[-1][1], levels[-1][2]) > COARSEST_PX:
        d = levels[-1][0] * LEVEL_STEP
        levels.append((d, math.ceil(width / d), math.ceil(height / d)))
    return levels


def _tile_rows(slide: readers.SlideReader, d: int, width: int, height: int, tile: int):
    """Tiles (tile × tile × 3, row-major) of the level with downsample ``d``, made one row of tiles at a time."""
    source = wsi.read_level_for(slide, 1.0, float(d))
    ds = float(slide.level_downsamples[source])
    src_w, src_h = slide.level_dimensions[source]
    across = math.ceil(width / tile)
    for row in range(0, height, tile):
        rows = min(tile, height - row)
        top = math.floor(row * d / ds)
        bottom = min(src_h, math.ceil((row + rows) * d / ds))
        band = wsi.read_rgb(slide, (0, round(top * ds)), source, (src_w, max(1, bottom - top)))
        band = wsi.resize_rgb(band, (width, rows))
        padded = np.full((tile, across * tile, 3), 255, np.uint8)
        padded[:rows, :width] = band
        for col in range(across):
            yield padded[:, col * tile : (col + 1) * tile]


def convert_to_pyramid_tiff(
    src: str | Path, dst: str | Path, *, mpp: float | None = None, tile: int = 256, quality: int = 90
) -> Converted:
    """Write ``src`` to ``dst`` as a pyramidal JPEG-tiled TIFF (atomically). ``mpp`` overrides the source's own;
    without either, the file has no physical resolution and the cohort sheet must give one."""
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 (JPEG blocks), got {tile}")
    slide_id = Path(src).stem
    with open_source(src, slide_id) as slide:
        source = "--mpp"
        if mpp is None:
            try:
                resolved = wsi.resolve_mpp(slide, src, slide_id)
                mpp, source = resolved.mpp, resolved.source
            except SlideError:
                mpp, source = None, ""
        width, height = slide.dimensions
        levels = level_sizes(width, height)
        with atomic_path(dst) as tmp, tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**31) as tw:
            for i, (d, w, h) in enumerate(levels):
                resolution = {}
                if mpp:
                    px_per_cm = 1e4 / (mpp * d)
                    resolution = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
                tw.write(
                    _tile_rows(slide, d, w, h, tile),
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    subfiletype=1 if i else 0,
                    metadata=None,
                    software="histoclip convert",
                    maxworkers=1,
                    compression="jpeg",
                    compressionargs={"level": int(quality)},
                    photometric="rgb",
                    **resolution,
                )
        return Converted(Path(dst), slide.name, tuple((w, h) for _, w, h in levels), mpp, source)
