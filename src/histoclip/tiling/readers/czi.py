"""Zeiss CZI slides, read with ``pylibCZIrw`` (Zeiss's own libCZI, maintained by Zeiss; the optional extra
``histoclip[czi]``).

Why pylibCZIrw: it is the maintained CZI package that installs here for Python 3.11 (a binary wheel), it reads
regions at any zoom from the file's own pyramid subblocks (so tissue detection never decodes the slide at full
resolution when the scanner wrote a pyramid), and it can write CZI, so the tests make their own slide. czifile's
current releases need Python ≥ 3.12 and its last 3.11 release dates from 2019; aicspylibczi and bioio-czi wrap
the same library with more dependencies.

Levels are offered at downsamples 1, 4, 16, ... (each read with libCZI's zoom), down to one that fits
:data:`~.base.VIRTUAL_LEVEL_MAX_PX`. Brightfield CZIs hold one Bgr24 channel; fluorescence CZIs (Gray8/Gray16
channels) are refused with what was found.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoclip.tiling.readers.base import (
    VIRTUAL_LEVEL_MAX_PX,
    Level,
    NotBrightfield,
    ReaderRefused,
    ReadError,
    RegionReader,
)

_DTYPES = {"Gray8": "uint8", "Gray16": "uint16", "Gray32Float": "float32", "Bgr24": "uint8", "Bgr48": "uint16"}
_WHITE = (255.0, 255.0, 255.0)


class CziReader(RegionReader):
    name = "pylibczirw"
    vendor = "zeiss-czi"
    mpp_source = "czi-metadata"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            from pylibCZIrw import czi as pyczi
        except ImportError as exc:
            raise ReaderRefused(
                "pylibCZIrw is not installed (CZI support is the optional extra: pip install 'histoclip[czi]')"
            ) from exc
        try:
            self._czi = pyczi.CziReader(str(path))
        except Exception as exc:
            raise ReaderRefused(f"pylibCZIrw: {exc}") from exc
        try:
            self._open()
        except Exception:
            self._czi.close()
            raise

    def _open(self) -> None:
        types = dict(self._czi.pixel_types)
        if len(types) != 1 or next(iter(types.values())) != "Bgr24":
            kinds = sorted(set(types.values()))
            channels = sum(3 if t.startswith("Bgr") else 1 for t in types.values())
            dtype = "/".join(sorted({_DTYPES.get(t, t) for t in kinds}))
            raise NotBrightfield(channels, dtype, f"CZI channels of pixel type {', '.join(kinds)}")
        box = self._czi.total_bounding_rectangle
        self._origin = (int(box.x), int(box.y))
        width, height = int(box.w), int(box.h)
        levels = [Level(width, height, 1.0, 0, 1)]
        while max(levels[-1].width, levels[-1].height) > VIRTUAL_LEVEL_MAX_PX:
            downsample = levels[-1].downsample * 4
            levels.append(
                Level(max(1, int(width // downsample)), max(1, int(height // downsample)), downsample, len(levels), 1)
            )
        self._levels = levels
        self._mpp = self._scaling_mpp()
        self._properties = {"czi.pixel-type": "Bgr24", "czi.origin": f"{self._origin[0]},{self._origin[1]}"}

    def _scaling_mpp(self) -> tuple[float, float] | None:
        try:
            items = self._czi.metadata["ImageDocument"]["Metadata"]["Scaling"]["Items"]["Distance"]
            metres = {item["@Id"]: float(item["Value"]) for item in items}
            mpp = metres["X"] * 1e6, metres["Y"] * 1e6
        except (KeyError, TypeError, ValueError):
            return None
        return mpp if mpp[0] > 0 and mpp[1] > 0 else None

    def metadata_mpp(self) -> tuple[float, float] | None:
        return self._mpp

    def close(self) -> None:
        self._czi.close()

    def _read_stored(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        d = self._levels[level].downsample
        roi = (
            self._origin[0] + round(x * d),
            self._origin[1] + round(y * d),
            max(1, round(width * d)),
            max(1, round(height * d)),
        )
        try:
            bgr = self._czi.read(roi=roi, plane={"C": 0}, zoom=1.0 / d, background_pixel=_WHITE)
        except Exception as exc:
            raise ReadError(f"CZI region {roi} at zoom 1/{d:g} cannot be decoded: {exc}") from exc
        rgb = np.ascontiguousarray(bgr[..., 2::-1])
        if rgb.shape[:2] != (height, width):  # libCZI rounds the zoomed size: pad with white or crop
            out = np.full((height, width, 3), 255, np.uint8)
            h, w = min(height, rgb.shape[0]), min(width, rgb.shape[1])
            out[:h, :w] = rgb[:h, :w]
            rgb = out
        return rgb
