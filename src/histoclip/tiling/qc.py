"""Quality control: per-slide thumbnails with the tissue outline and tile grid, and the cohort table.

The thumbnail is what a pathologist looks at to trust (or not) an automatic tissue mask; the cohort table
is where a failed or oddly-scaled slide shows up among thousands without opening a log.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from scipy import ndimage

from histoclip import formats
from histoclip.store import atomic_path

TISSUE_OUTLINE_RGB = (0, 200, 0)
TILE_RGB = (30, 90, 255)


def qc_thumbnail(
    rgb: np.ndarray,
    mask: np.ndarray,
    level0_size: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    tile_level0_px: int,
    max_px: int = 1024,
) -> Image.Image:
    """The slide image with the tissue outline (green) and every kept tile (blue squares) drawn on it."""
    height, width = rgb.shape[:2]
    scale = min(1.0, max_px / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(rgb).resize(size, Image.Resampling.BOX) if scale < 1 else Image.fromarray(rgb)
    mask_small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    outline = mask_small & ~ndimage.binary_erosion(mask_small, iterations=max(1, round(max(size) / 500)))
    pixels = np.array(image.convert("RGB"))
    pixels[outline] = TISSUE_OUTLINE_RGB
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    fx = size[0] / level0_size[0]
    fy = size[1] / level0_size[1]
    for tx, ty in zip(x.tolist(), y.tolist(), strict=True):
        draw.rectangle(
            [tx * fx, ty * fy, (tx + tile_level0_px) * fx - 1, (ty + tile_level0_px) * fy - 1], outline=TILE_RGB
        )
    return image


def error_thumbnail(slide_id: str, error: str, size: int = 512) -> Image.Image:
    """A placeholder image that says why a slide has no QC thumbnail (it failed), so the gap is visible."""
    image = Image.new("RGB", (size, size // 2), (245, 235, 235))
    draw = ImageDraw.Draw(image)
    text = f"{slide_id}: FAILED\n\n" + "\n".join(textwrap.wrap(error, width=size // 7))
    draw.multiline_text((10, 10), text, fill=(160, 0, 0))
    return image


def save_png(image: Image.Image, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def cohort_table(tile_files: Iterable[str | Path]) -> pd.DataFrame:
    """One row per slide from the tile files' metadata (the footer only: cheap for any cohort size)."""
    rows = []
    for path in tile_files:
        meta = formats.read_tile_metadata(path)
        row = {column: meta.get(column, "") for column in formats.COHORT_COLUMNS}
        row["warnings"] = " | ".join(meta.get("warnings", []) or [])
        rows.append(row)
    return pd.DataFrame(rows, columns=list(formats.COHORT_COLUMNS))


def write_cohort_table(tile_files: Iterable[str | Path], path: str | Path) -> pd.DataFrame:
    table = cohort_table(tile_files)
    formats.write_cohort_table(table, path)
    return table
