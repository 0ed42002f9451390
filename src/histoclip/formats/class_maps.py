"""Class maps of the demo cohort (``results/demo/class_maps/{slide}.png``): the true tissue class of every pixel.

A class map is a uint8 PNG of class indices at ``downsample`` level-0 pixels per map pixel; the downsample and
the class names (index → name) travel in PNG text chunks, so a reader needs nothing but the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from histoclip.errors import InputError
from histoclip.store import atomic_path

__all__ = ["read_class_map", "read_class_map_classes", "tile_classes", "write_class_map"]

DOWNSAMPLE_KEY = "histoclip.downsample"
CLASSES_KEY = "histoclip.classes"


def write_class_map(path: str | os.PathLike[str], label: np.ndarray, downsample: int, classes: Sequence[str]) -> None:
    """uint8 PNG of class indices; the downsample and class names travel in PNG text chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text(DOWNSAMPLE_KEY, str(downsample))
    info.add_text(CLASSES_KEY, json.dumps(list(classes)))
    with atomic_path(path) as tmp:
        Image.fromarray(label, mode="L").save(tmp, format="PNG", pnginfo=info)


def _text(image: Image.Image, key: str, path: str | os.PathLike[str]) -> str:
    value = getattr(image, "text", {}).get(key)
    if value is None:
        raise InputError(f"no {key!r} text chunk: not a class map", where=str(path), fix="re-run the demo rules")
    return value


def read_class_map(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """A class map and its downsample (level-0 px per map px), read from the PNG's text chunk."""
    with Image.open(path) as image:
        downsample = int(_text(image, DOWNSAMPLE_KEY, path))
        label = np.asarray(image.convert("L") if image.mode != "L" else image).copy()
    return label, downsample


def read_class_map_classes(path: str | os.PathLike[str]) -> list[str]:
    """The class names of a class map, by index."""
    with Image.open(path) as image:
        return list(json.loads(_text(image, CLASSES_KEY, path)))


def tile_classes(
    class_map_path: str | os.PathLike[str],
    x: np.ndarray | Sequence[int] | int,
    y: np.ndarray | Sequence[int] | int,
    tile_level0_px: int,
) -> np.ndarray:
    """True tissue class (name) at the centre of each tile; x, y are level-0 top-left corners.

    The centre, not a majority vote, because that is what a user can check by eye on a thumbnail
    and what tiling code knows without reading pixels. Centres off the map count as background (index 0).
    """
    label, downsample = read_class_map(class_map_path)
    cx = (np.asarray(x, dtype=np.int64) + tile_level0_px // 2) // downsample
    cy = (np.asarray(y, dtype=np.int64) + tile_level0_px // 2) // downsample
    inside = (cx >= 0) & (cy >= 0) & (cx < label.shape[1]) & (cy < label.shape[0])
    index = np.zeros(np.broadcast(cx, cy).shape, np.int64)
    index[inside] = label[cy[inside], cx[inside]]
    return np.asarray(read_class_map_classes(class_map_path))[index]  # a str array shaped like x and y broadcast
