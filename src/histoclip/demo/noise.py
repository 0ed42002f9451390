"""Random fields and geometry the demo's layout and painting are built from (smooth noise, resizing, Worley cells)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage as ndi


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation (float32)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    std = float(field.std())
    return field / std if std > 0 else field


def upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float32 field (PIL is much faster than scipy.ndimage.zoom here)."""
    image = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def upsample_u8(layer: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 layer (a quantised stain layer brought to level 0)."""
    image = Image.fromarray(np.ascontiguousarray(layer), mode="L")
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def worley(
    y: np.ndarray, x: np.ndarray, cell: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest seed of a jittered grid (cellular "Worley" noise).

    ``F2 - F1`` is ~0 on the borders of the Voronoi cells around the seeds: polygonal cell membranes
    for squamous cells and adipocytes. Returns (F2 - F1, seed y, seed x) with all seeds in µm.
    """
    ny = int(np.max(y, initial=0) // cell) + 3
    nx = int(np.max(x, initial=0) // cell) + 3
    seed_y = ((np.arange(ny)[:, None] - 1) + rng.uniform(0.15, 0.85, (ny, nx))) * cell
    seed_x = ((np.arange(nx)[None, :] - 1) + rng.uniform(0.15, 0.85, (ny, nx))) * cell
    gy = (y // cell).astype(np.int32) + 1
    gx = (x // cell).astype(np.int32) + 1
    d1 = np.full(y.shape, np.inf, np.float32)
    d2 = np.full(y.shape, np.inf, np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sy = seed_y[gy + dy, gx + dx]
            sx = seed_x[gy + dy, gx + dx]
            d = (y - sy) ** 2 + (x - sx) ** 2
            closer = d < d1
            d2 = np.where(closer, d1, np.minimum(d2, d))
            d1 = np.where(closer, d, d1)
    return np.sqrt(d2) - np.sqrt(d1), seed_y[1:-1, 1:-1], seed_x[1:-1, 1:-1]
