"""Writing pyramidal JPEG-tiled TIFFs that OpenSlide opens as ``generic-tiff``, byte-identical for identical pixels.

Why here: the demo cohort, the large benchmark slide and the tests' small slides all need slides that real
readers open, written without time- or machine-dependent bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

from histoclip.store import atomic_path


def tiff_resolution(mpp: float | None) -> dict[str, Any]:
    """Resolution keywords for tifffile: pixels per centimetre, which OpenSlide turns into mpp.

    Without an mpp, tifffile still writes the baseline XResolution/YResolution tags (1/1) but with
    ResolutionUnit NONE, which no reader converts into a physical size.
    """
    if mpp is None:
        return {}
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    px_per_cm = 1e4 / mpp
    return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}


def jpeg_options(quality: int) -> dict[str, Any]:
    """tifffile keywords for JPEG-compressed RGB tiles."""
    return {"compression": "jpeg", "compressionargs": {"level": int(quality)}, "photometric": "rgb"}


def encode_jpeg_tile(tile_rgb: np.ndarray, quality: int) -> bytes:
    """Encode one tile exactly as tifffile does for ``compression='jpeg', photometric='rgb'``.

    tifffile stores such tiles as YCbCr with 2×2 chroma subsampling; pre-encoded tiles must match.
    """
    return imagecodecs.jpeg8_encode(
        tile_rgb, level=int(quality), subsampling=(2, 2), colorspace="RGB", outcolorspace="YCBCR"
    )


def reduce_area(image: Image.Image, factor: int) -> Image.Image:
    """Area-average downsampling (a partial edge block averages the pixels it has)."""
    return image if factor == 1 else image.reduce(factor)


def write_pyramid_tiff(
    path: str | os.PathLike[str],
    level0_rgb: np.ndarray,
    *,
    mpp: float | None,
    downsamples: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    quality: int = 90,
) -> None:
    """Write an RGB image as a pyramidal JPEG-tiled TIFF that OpenSlide opens as ``generic-tiff``.

    One page per level (successive pages, not SubIFDs, which OpenSlide does not see), reduced levels
    marked ``subfiletype=1`` and made by area averaging. ``mpp`` becomes the resolution in pixels per
    centimetre, which OpenSlide reports as ``openslide.mpp-x``/``-y``; ``mpp=None`` writes no physical
    resolution (unit NONE), the "slide without mpp" case. No DateTime tag and a fixed Software tag, so
    the file is byte-identical for identical pixels. Written to a temporary file and renamed.
    """
    rgb = np.asarray(level0_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"level0_rgb must be a (height, width, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
    ds = [int(d) for d in downsamples]
    if not ds or ds[0] != 1 or any(b <= a for a, b in zip(ds, ds[1:], strict=False)):
        raise ValueError(f"downsamples must start at 1 and increase, got {tuple(downsamples)}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 (JPEG MCU), got {tile}")
    options = {**jpeg_options(quality), **tiff_resolution(mpp)}
    level0 = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tw:
        previous, previous_ds = level0, 1
        for i, d in enumerate(ds):
            # Reduce from the previous level when the factor divides (cheaper, same area average).
            image = reduce_area(previous, d // previous_ds) if d % previous_ds == 0 else reduce_area(level0, d)
            tw.write(
                np.asarray(image),
                tile=(tile, tile),
                subfiletype=1 if i else 0,
                metadata=None,
                software="histoclip.synth",
                maxworkers=1,
                **options,
            )
            previous, previous_ds = image, d
