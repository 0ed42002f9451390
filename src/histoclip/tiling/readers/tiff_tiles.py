"""The OpenSlide reader's fast path: regions of a JPEG-tiled TIFF pyramid decoded from the TIFF's own tiles.

Why: measured on the benchmark's 30k × 30k JPEG TIFF (2 cores), OpenSlide's ``read_region`` spends about three
times as long painting decoded tiles into the region (~30 ns per output pixel, even for tiles it has cached) as
libjpeg-turbo spends decoding them. Decoding the stored tiles a region overlaps and copying them into place reads
the same pixels at several times the rate, and a small cache of decoded tiles (:data:`CACHE`) means a tile shared
by neighbouring regions (a grid tile straddles up to four stored tiles) is decoded once, not once per region.

When it is used, so that what is read stays byte-identical to OpenSlide:

- only for files OpenSlide reads as ``generic-tiff`` or ``aperio`` (each level one tiled TIFF page, no overlaps),
  at levels whose page is 8-bit RGB/YCbCr, three samples, contiguous, JPEG-compressed (what scanners and
  ``histoclip convert`` write);
- only for reads at whole pixels of the level (a level-0 location that maps to an integer pixel; OpenSlide
  resamples reads at fractional positions, and those stay OpenSlide's);
- only after a check, per level and per open file: the level's largest stored tile (the most detail) decoded here
  must equal OpenSlide's ``read_region`` of the same rectangle, byte for byte. Both use libjpeg-turbo's defaults;
  a file where they disagree is read by OpenSlide alone;
- tiles are decoded by libjpeg-turbo (``simplejpeg``) with OpenSlide's settings (accurate DCT, fancy upsampling)
  and, like OpenSlide, with libjpeg's warnings as errors: imagecodecs and Pillow decode a damaged tile with only a
  warning and return pixels where OpenSlide fails ("Corrupt JPEG data: premature end of data segment");
- anything unusual in a read (a missing or truncated tile, a decoding error or warning) raises :class:`Unserved`
  and the read goes to OpenSlide, so damaged tiles fail as they always have, with OpenSlide's own messages.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

try:
    import simplejpeg
except ImportError:  # an environment without it reads every region through OpenSlide
    simplejpeg = None

#: OpenSlide vendors whose levels are plain tiled TIFF pages, one per level.
VENDORS = ("generic-tiff", "aperio")
#: TIFF compression JPEG ("new-style", 7).
JPEG = 7
#: TIFF Photometric RGB (2): JPEG data stored without a colour transform (Aperio).
RGB_PHOTOMETRIC = 2
#: Decoded tiles kept per process, whatever the number of open slides (bytes): a few rows of stored tiles of a wide
#: slide, so that the next row of grid tiles finds the stored tiles it shares with the row above. A loader worker
#: keeps several slides open; the budget is theirs together (16 workers: 768 MB).
CACHE_BYTES = 48 * 2**20


class TileCache:
    """Decoded stored tiles, least recently used first out, within a byte budget, shared by a process's decoders."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self._tiles: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the preflight checks slides in threads

    def get(self, key: tuple[int, int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int, int], tile: np.ndarray) -> None:
        with self._lock:
            if key in self._tiles:
                return
            self._tiles[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self.limit and len(self._tiles) > 1:
                _, evicted = self._tiles.popitem(last=False)
                self._bytes -= evicted.nbytes

    def drop(self, owner: int) -> None:
        """Forget the tiles of one decoder (closed)."""
        with self._lock:
            for key in [key for key in self._tiles if key[0] == owner]:
                self._bytes -= self._tiles.pop(key).nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _after_fork(self) -> None:
        """A forked child (a loader worker) starts with an empty cache and a free lock of its own."""
        self._lock = threading.Lock()
        self._tiles = OrderedDict()
        self._bytes = 0


#: The process's cache.
CACHE = TileCache()
os.register_at_fork(after_in_child=CACHE._after_fork)
_owners = itertools.count()


class Unserved(Exception):
    """This read is not one the fast path makes (the caller reads it with OpenSlide)."""


def jpeg_stream(data: bytes, tables: bytes | None, rgb: bool) -> bytes:
    """The whole JPEG stream of a TIFF tile: the page's JPEGTables spliced in after SOI and, for Photometric RGB
    (Aperio), the components named R, G, B, so that libjpeg-turbo decodes them as RGB, as OpenSlide tells it to
    (without a name or marker saying otherwise, libjpeg assumes YCbCr)."""
    if tables is not None and len(tables) > 4:
        data = data[:2] + tables[2:-2] + data[2:]
    if not rgb:
        return data
    stream = bytearray(data)
    names = {}
    pos = 2
    while pos + 4 <= len(stream) and stream[pos] == 0xFF:
        marker = stream[pos + 1]
        length = (stream[pos + 2] << 8) | stream[pos + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame: its component ids
            count = stream[pos + 9]
            for i, name in zip(range(count), b"RGB", strict=False):
                at = pos + 10 + 3 * i
                names[stream[at]] = name
                stream[at] = name
        elif marker == 0xDA:  # start of scan: the components it names, renamed alike
            for i in range(stream[pos + 4]):
                at = pos + 5 + 2 * i
                stream[at] = names.get(stream[at], stream[at])
            break
        pos += 2 + length
    return bytes(stream)


class TiffTileDecoder:
    """Regions of the levels of a tiled TIFF, decoded tile by tile (see the module docstring)."""

    def __init__(self, path: str | Path, level_dimensions: tuple[tuple[int, int], ...], cache: TileCache) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(path)
        self._file_size = self._tif.filehandle.size
        self._pages = [self._page_for(width, height) for width, height in level_dimensions]
        self._cache = cache
        self._owner = next(_owners)
        #: stored tiles decoded (a measure of how well the cache works: tests and the benchmark read it)
        self.decoded = 0

    @classmethod
    def open(
        cls,
        path: str | Path,
        vendor: str,
        level_dimensions: tuple[tuple[int, int], ...],
        cache: TileCache | None = None,
    ) -> TiffTileDecoder | None:
        """A decoder for ``path``, or None when the file is not one the fast path reads."""
        if vendor not in VENDORS or simplejpeg is None:
            return None
        try:
            decoder = cls(path, level_dimensions, CACHE if cache is None else cache)
        except Exception:  # tifffile cannot parse what OpenSlide opened: OpenSlide reads it alone
            return None
        if not any(page is not None for page in decoder._pages):
            decoder.close()
            return None
        return decoder

    def _page_for(self, width: int, height: int):  # noqa: ANN202 (tifffile.TiffPage)
        """The one tiled top-level page of this size that the fast path can decode, or None."""
        import tifffile

        matches = [
            page
            for page in self._tif.pages
            if isinstance(page, tifffile.TiffPage) and (page.imagewidth, page.imagelength) == (width, height)
        ]
        if len(matches) != 1:
            return None
        page = matches[0]
        decodable = (
            page.is_tiled
            and page.compression == JPEG
            and page.dtype == np.uint8
            and page.samplesperpixel == 3
            and page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
            and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
            and page.imagedepth == 1
        )
        return page if decodable else None

    def serves(self, level: int) -> bool:
        return self._pages[level] is not None

    def largest_tile(self, level: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) at ``level`` of its stored tile with the most bytes, clipped to the image."""
        page = self._pages[level]
        index = int(np.argmax(page.databytecounts))
        across = math.ceil(page.imagewidth / page.tilewidth)
        x, y = (index % across) * page.tilewidth, (index // across) * page.tilelength
        return x, y, min(page.tilewidth, page.imagewidth - x), min(page.tilelength, page.imagelength - y)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of the level's pixels [y:y+height, x:x+width], white outside the image."""
        page = self._pages[level]
        if page is None:
            raise Unserved(f"level {level} is not a JPEG-tiled page")
        out = np.empty((height, width, 3), np.uint8)
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(page.imagewidth, x + width), min(page.imagelength, y + height)
        if x0 != x or y0 != y or x1 != x + width or y1 != y + height:
            out.fill(255)  # OpenSlide's transparent pixels, composited onto white
        if x1 <= x0 or y1 <= y0:
            return out
        tw, th = page.tilewidth, page.tilelength
        across = math.ceil(page.imagewidth / tw)
        for row in range(y0 // th, (y1 - 1) // th + 1):
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(level, page, row * across + col)
                tx, ty = col * tw, row * th
                top, left = max(y0, ty), max(x0, tx)
                bottom, right = min(y1, ty + th), min(x1, tx + tw)
                out[top - y : bottom - y, left - x : right - x] = tile[top - ty : bottom - ty, left - tx : right - tx]
        return out

    def _tile(self, level: int, page, index: int) -> np.ndarray:  # noqa: ANN001 (tifffile.TiffPage)
        key = (self._owner, level, index)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if count == 0 or offset + count > self._file_size:
            raise Unserved(f"stored tile {index} of level {level} is missing or lies past the end of the file")
        fh = self._tif.filehandle
        with fh.lock:
            fh.seek(offset)
            data = fh.read(count)
        stream = jpeg_stream(data, page.jpegtables, page.photometric == RGB_PHOTOMETRIC)
        try:  # strict: libjpeg's warnings (corrupt data) are errors, as OpenSlide makes them
            tile = simplejpeg.decode_jpeg(stream, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
        except Exception as exc:
            raise Unserved(f"stored tile {index} of level {level} cannot be decoded here: {exc}") from exc
        if tile.shape != (page.tilelength, page.tilewidth, 3):
            raise Unserved(f"stored tile {index} of level {level} decodes to shape {tile.shape}")
        self.decoded += 1
        self._cache.put(key, tile)
        return tile

    def close(self) -> None:
        self._cache.drop(self._owner)
        self._tif.close()
