"""TIFFs OpenSlide rejects, read with tifffile: untiled (stripped) RGB TIFFs, OME-TIFF (pyramids in SubIFDs,
which OpenSlide does not see), and other TIFF layouts tifffile knows.

A region is read by decoding only the stored segments (strips or tiles) it overlaps; an uncompressed image
stored as one contiguous block is read row range by row range straight from the file. So neither a tile read
nor tissue detection (which reads a virtual level, averaged band by band: :mod:`.base`) loads the image whole.
The one layout that cannot be bounded is a compressed image stored as a single strip: decoding any part of it
decodes all of it (``histoclip convert`` rewrites such a file as a tiled pyramid once).

Files that are not brightfield RGB (fluorescence, multiplex, 16-bit grayscale: QPTIFF, most OME-TIFF from
microscopes) are refused with what was found (:class:`~.base.NotBrightfield`).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile

from histoclip.tiling.readers.base import (
    Level,
    NotBrightfield,
    ReaderRefused,
    ReadError,
    RegionReader,
    add_virtual_levels,
)

#: Photometric interpretations of 3- or 4-sample brightfield RGB pages.
_RGB_PHOTOMETRIC = (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
#: µm per unit of OME's PhysicalSize units.
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def channels_and_dtype(series: tifffile.TiffPageSeries) -> tuple[int, str]:
    """How many channels (samples or planes) a series has per pixel, and their data type."""
    channels = 1
    for axis in "CS":
        if axis in series.axes:
            channels *= series.shape[series.axes.index(axis)]
    return channels, str(series.dtype)


def brightfield_page(page: tifffile.TiffPage) -> bool:
    return (
        page.dtype == np.uint8
        and page.samplesperpixel in (3, 4)
        and page.photometric in _RGB_PHOTOMETRIC
        and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
    )


def ome_mpp(tif: tifffile.TiffFile) -> tuple[float, float] | None:
    """(x, y) µm/px from the first OME Pixels element's PhysicalSizeX/Y, or None."""
    if not tif.is_ome or not tif.ome_metadata:
        return None
    try:
        root = ET.fromstring(tif.ome_metadata)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    values = []
    for axis in "XY":
        size = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if size is None or unit not in _OME_UNIT_UM:
            return None
        values.append(float(size) * _OME_UNIT_UM[unit])
    return values[0], values[1]


class TiffReader(RegionReader):
    name = "tifffile"
    mpp_source = "ome-metadata"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as exc:  # not a TIFF, or one whose directories cannot be parsed
            raise ReaderRefused(f"tifffile: {exc}") from exc
        try:
            self._open()
        except Exception:
            self._tif.close()
            raise

    def _open(self) -> None:
        tif = self._tif
        if not tif.series:
            raise ReaderRefused("tifffile: no image series in the file")
        series = tif.series[0]
        page = series.keyframe
        if not brightfield_page(page):
            channels, dtype = channels_and_dtype(series)
            if page.dtype == np.uint8 and channels in (3, 4) and page.photometric in _RGB_PHOTOMETRIC:
                raise ReaderRefused("tifffile: RGB stored as separate planes is not read")
            raise NotBrightfield(channels, dtype, f"{series.kind or 'TIFF'} series of shape {series.shape}")
        self._pages: list[tifffile.TiffPage] = []
        stored: list[Level] = []
        for level in series.levels:
            level_page = level.keyframe
            if not brightfield_page(level_page):
                break
            if level_page.compression != 1 and level_page.compression not in tifffile.TIFF.DECOMPRESSORS:
                raise ReaderRefused(f"tifffile: TIFF compression {int(level_page.compression)} cannot be decoded")
            self._pages.append(level_page)
            downsample = page.imagewidth / level_page.imagewidth
            stored.append(Level(level_page.imagewidth, level_page.imagelength, downsample, len(stored), 1))
        self._levels = add_virtual_levels(stored)
        self._file_size = tif.filehandle.size
        self._mpp = ome_mpp(tif)
        self.vendor = "ome-tiff" if tif.is_ome else "tiff"
        self._properties = {
            "tiff.series-kind": str(series.kind),
            "tiff.compression": page.compression.name if hasattr(page.compression, "name") else str(page.compression),
            "tiff.layout": "tiled" if page.is_tiled else "stripped",
            "tiff.stored-levels": str(len(stored)),
        }

    def metadata_mpp(self) -> tuple[float, float] | None:
        return self._mpp

    def tile_size(self, level: int) -> tuple[int, int] | None:
        spec = self._levels[level]
        if spec.factor != 1:
            return None
        page = self._pages[spec.source]
        if page.is_tiled:
            return page.tilewidth, page.tilelength
        return page.imagewidth, page.rowsperstrip or page.imagelength

    def close(self) -> None:
        self._tif.close()

    def _read_stored(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        if page.compression == 1 and page.is_contiguous and not page.is_tiled:
            return self._read_contiguous(page, x, y, width, height)
        return self._read_segments(page, x, y, width, height)

    def _read_contiguous(self, page: tifffile.TiffPage, x: int, y: int, width: int, height: int) -> np.ndarray:
        offset = int(page.dataoffsets[0])  # contiguous: the strips follow each other from the first
        spp = page.samplesperpixel
        row_bytes = page.imagewidth * spp
        start = offset + y * row_bytes
        if start + height * row_bytes > self._file_size:
            raise ReadError(f"image rows {y}-{y + height} lie past the end of the file ({self._file_size:,} bytes)")
        fh = self._tif.filehandle
        with fh.lock:
            fh.seek(start)
            data = fh.read(height * row_bytes)
        rows = np.frombuffer(data, np.uint8).reshape(height, page.imagewidth, spp)
        return rows[:, x : x + width, :3].copy()

    def _read_segments(self, page: tifffile.TiffPage, x: int, y: int, width: int, height: int) -> np.ndarray:
        if page.is_tiled:
            seg_w, seg_h = page.tilewidth, page.tilelength
            across = math.ceil(page.imagewidth / seg_w)
            indices = [
                row * across + col
                for row in range(y // seg_h, (y + height - 1) // seg_h + 1)
                for col in range(x // seg_w, (x + width - 1) // seg_w + 1)
            ]
        else:
            rows_per_strip = page.rowsperstrip or page.imagelength
            indices = list(range(y // rows_per_strip, (y + height - 1) // rows_per_strip + 1))
        out = np.full((height, width, 3), 255, np.uint8)
        fh = self._tif.filehandle
        decode = page.decode
        for index in indices:
            offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
            if count == 0:
                continue  # a sparse file's missing segment: background
            if offset + count > self._file_size:
                raise ReadError(
                    f"TIFF segment {index} of page {page.index} ends at byte {offset + count:,} but the file has "
                    f"{self._file_size:,} bytes"
                )
            with fh.lock:
                fh.seek(offset)
                data = fh.read(count)
            try:
                segment, (_, _, seg_y, seg_x, _), _ = decode(data, index, jpegtables=page.jpegtables)
            except Exception as exc:
                raise ReadError(f"TIFF segment {index} of page {page.index} cannot be decoded: {exc}") from exc
            segment = segment[0]
            top, left = max(y, seg_y), max(x, seg_x)
            bottom = min(y + height, seg_y + segment.shape[0], page.imagelength)
            right = min(x + width, seg_x + segment.shape[1], page.imagewidth)
            if bottom > top and right > left:
                out[top - y : bottom - y, left - x : right - x] = segment[
                    top - seg_y : bottom - seg_y, left - seg_x : right - seg_x, :3
                ]
        return out
