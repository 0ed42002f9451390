"""A large synthetic slide for benchmarks: a realistic size without holding level 0 in memory."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from histoclip.demo.classes import (
    ADENOCARCINOMA,
    CLASS_MAP_DOWNSAMPLE,
    FAT,
    LYMPHOCYTES,
    NECROSIS,
    SQUAMOUS,
    STROMA,
)
from histoclip.demo.noise import smooth_noise, upsample
from histoclip.demo.paint import render_slide
from histoclip.demo.stain import Stain
from histoclip.demo.tiff import encode_jpeg_tile, jpeg_options, reduce_area, tiff_resolution
from histoclip.store import atomic_path

_LARGE_TEXTURE_CLASSES = (ADENOCARCINOMA, SQUAMOUS, STROMA, LYMPHOCYTES, NECROSIS, FAT, ADENOCARCINOMA, STROMA)


class _TileSource:
    """Tiles of a pyramid whose level 0 is a mosaic of a few pre-encoded texture tiles.

    A level-L tile is identified by a key: ``"w"`` (white) or the tuple of its 16 level-(L-1) child
    keys; a level-0 tissue tile is ``(variant, row, col)`` inside a 4×4-tile texture block. Tiles are
    composed from their children's 64×64 reductions and encoded once per distinct key, so repeated
    content (white, whole texture blocks) costs nothing and level 0 is never held in memory.
    """

    def __init__(self, textures: list[np.ndarray], tile: int, quality: int) -> None:
        self.tile, self.quality = tile, quality
        self.textures = textures
        self._bytes: dict[Any, bytes] = {}
        self._small: dict[Any, np.ndarray] = {}
        white = np.full((tile, tile, 3), 255, np.uint8)
        self._bytes["w"] = encode_jpeg_tile(white, quality)
        self._small["w"] = white[: tile // 4, : tile // 4]

    def pixels(self, key: Any) -> np.ndarray:
        t = self.tile
        if key == "w":
            return np.full((t, t, 3), 255, np.uint8)
        if isinstance(key[0], int):  # level 0: (variant, row, col)
            v, r, c = key
            return self.textures[v][r * t : (r + 1) * t, c * t : (c + 1) * t]
        q = t // 4
        out = np.empty((t, t, 3), np.uint8)
        for i, child in enumerate(key):
            out[(i // 4) * q : (i // 4 + 1) * q, (i % 4) * q : (i % 4 + 1) * q] = self.small(child)
        return out

    def small(self, key: Any) -> np.ndarray:
        """The tile reduced 4× by area averaging (its footprint in the next level)."""
        if key not in self._small:
            self._small[key] = np.asarray(reduce_area(Image.fromarray(self.pixels(key)), 4))
        return self._small[key]

    def encoded(self, key: Any) -> bytes:
        if key not in self._bytes:
            self._bytes[key] = encode_jpeg_tile(np.ascontiguousarray(self.pixels(key)), self.quality)
        return self._bytes[key]


def _tissue_keys(
    rng: np.random.Generator, level0_px: int, tissue_fraction: float, tile: int, block: int, n_textures: int
) -> np.ndarray:
    """Level-0 tile keys: a tissue mask on the tile grid (one or two smooth blobs, thresholded to
    ``tissue_fraction`` of the area) whose tiles show a texture chosen per ``block``×``block`` tiles; white
    elsewhere."""
    n0 = -(-level0_px // tile)
    g = 96
    yy, xx = np.mgrid[0:g, 0:g].astype(np.float32) / g
    field = np.exp(-(((yy - 0.48) / 0.3) ** 2 + ((xx - 0.45) / 0.34) ** 2))
    field += 0.6 * np.exp(-(((yy - 0.7) / 0.18) ** 2 + ((xx - 0.75) / 0.16) ** 2))
    field += 0.25 * smooth_noise(rng, (g, g), 6)
    field *= np.clip(np.minimum(np.minimum(yy, 1 - yy), np.minimum(xx, 1 - xx)) / 0.06, 0, 1)
    mask_field = upsample(field, (n0, n0))
    tissue = mask_field > np.quantile(mask_field, 1 - tissue_fraction)
    variants = rng.integers(0, n_textures, (-(-n0 // block), -(-n0 // block)))

    keys = np.empty((n0, n0), dtype=object)
    keys[:] = "w"
    for r, c in zip(*np.nonzero(tissue), strict=True):
        keys[r, c] = (int(variants[r // block, c // block]), int(r % block), int(c % block))
    return keys


def _pyramid_keys(keys: np.ndarray) -> list[np.ndarray]:
    """The keys of levels 0 to 3: a level-L tile is the tuple of its 16 children, or white if they all are."""
    levels = [keys]
    for _ in range(3):
        prev = levels[-1]
        n = -(-prev.shape[0] // 4)
        nxt = np.empty((n, n), dtype=object)
        for r in range(n):
            for c in range(n):
                children = tuple(
                    prev[4 * r + i, 4 * c + j] if 4 * r + i < prev.shape[0] and 4 * c + j < prev.shape[1] else "w"
                    for i in range(4)
                    for j in range(4)
                )
                nxt[r, c] = "w" if all(k == "w" for k in children) else children
        levels.append(nxt)
    return levels


def write_large_slide(
    path: str | os.PathLike[str],
    *,
    level0_px: int = 100_000,
    mpp: float = 0.25,
    tissue_fraction: float = 0.5,
    seed: int = 0,
) -> None:
    """Write a ``level0_px``² pyramidal JPEG-tiled BigTIFF (downsamples 1, 4, 16, 64) for benchmarks.

    A realistic size for tiling/embedding benchmarks (100k² ≈ a 40× resection) without holding level 0
    (30 GB at 100k²) in memory: level 0 is a mosaic of eight 1024² painted textures placed on a
    tile-resolution tissue mask (about ``tissue_fraction`` of the area, on white), fed to tifffile as
    pre-encoded JPEG tiles; reduced levels are composed from the same tiles. Tissue edges are
    therefore 256-px steps at level 0. Deterministic for a seed; written atomically.
    """
    if level0_px < 1024:
        raise ValueError(f"level0_px must be at least 1024, got {level0_px}")
    if not (0 < tissue_fraction < 1):
        raise ValueError(f"tissue_fraction must be in (0, 1), got {tissue_fraction}")
    tile, quality, block = 256, 90, 4
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    texture_px = tile * block
    textures = []
    for cls in _LARGE_TEXTURE_CLASSES:
        label4 = np.full((texture_px // CLASS_MAP_DOWNSAMPLE,) * 2, cls, np.uint8)
        textures.append(render_slide(rng, label4, mpp, Stain.random(rng)))
    source = _TileSource(textures, tile, quality)
    levels = _pyramid_keys(_tissue_keys(rng, level0_px, tissue_fraction, tile, block, len(textures)))

    options = {**jpeg_options(quality), **tiff_resolution(mpp)}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, level_keys in enumerate(levels):
            size = -(-level0_px // 4**i)
            tw.write(
                (source.encoded(k) for k in level_keys.ravel()),
                shape=(size, size, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                subfiletype=1 if i else 0,
                metadata=None,
                software="histoclip.synth",
                **options,
            )
