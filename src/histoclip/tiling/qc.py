"""Quality control: per-slide thumbnails with the tissue outline and tile grid, and the cohort table.

The thumbnail is what a pathologist looks at to trust (or not) an automatic tissue mask; the cohort table
is where a failed or oddly-scaled slide shows up among thousands without opening a log. A failed slide's image
keeps whatever of the slide could still be read beside the error, because "no tissue tile" or "no mpp" is judged
by looking at the slide.

Text is drawn in DejaVu Sans, the font matplotlib ships (so it is there wherever the figures can be drawn):
Pillow's default font has no µ or ², and the messages are full of µm/px and mm².
"""

from __future__ import annotations

import functools
import importlib.util
import textwrap
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from histoclip import formats
from histoclip.store import atomic_path

TISSUE_OUTLINE_RGB = (0, 200, 0)
TILE_RGB = (30, 90, 255)
ERROR_BACKGROUND_RGB = (245, 235, 235)
ERROR_TEXT_RGB = (160, 0, 0)
#: Text size of the QC images, in pixels.
TEXT_PX = 14


def dejavu_sans_path() -> Path:
    """matplotlib's bundled DejaVu Sans (found without importing matplotlib, which tile workers don't need)."""
    spec = importlib.util.find_spec("matplotlib")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        candidate = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if candidate.is_file():
            return candidate
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


@functools.cache
def qc_font(size_px: int = TEXT_PX) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at ``size_px``: it has µ, ², × and the other characters of the messages (see the docstring)."""
    return ImageFont.truetype(str(dejavu_sans_path()), size_px)


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


def error_thumbnail(slide_id: str, error: str, size: int = 512, thumbnail: np.ndarray | None = None) -> Image.Image:
    """The QC image of a failed slide: the error, and beside it the slide's ``thumbnail`` (RGB) when one could
    still be read (scaled to ``size`` px on its longest side), so that the gap is visible and can be judged."""
    font = qc_font()
    chars_per_line = max(20, int(size / (0.6 * font.size)))
    paragraphs = error.replace(" Fix: ", "\nFix: ").split("\n")  # the fix on a line of its own
    text = f"{slide_id}: FAILED\n\n" + "\n".join(
        line for paragraph in paragraphs for line in textwrap.wrap(paragraph, width=chars_per_line) or [""]
    )
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = measure.multiline_textbbox((0, 0), text, font=font)
    text_w, text_h = right - min(left, 0) + 20, bottom - min(top, 0) + 20
    picture = None
    if thumbnail is not None and thumbnail.size:
        height, width = thumbnail.shape[:2]
        scale = size / max(width, height)
        fit = (max(1, round(width * scale)), max(1, round(height * scale)))
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.NEAREST  # a tiny slide stays sharp
        picture = Image.fromarray(np.ascontiguousarray(thumbnail[..., :3])).resize(fit, resample)
    offset = picture.width + 10 if picture is not None else 0
    image = Image.new(
        "RGB",
        (offset + max(size, text_w), max(size // 2, text_h, picture.height if picture else 0)),
        ERROR_BACKGROUND_RGB,
    )
    if picture is not None:
        image.paste(picture, (0, 0))
    ImageDraw.Draw(image).multiline_text((offset + 10, 10), text, fill=ERROR_TEXT_RGB, font=font)
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
