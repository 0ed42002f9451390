"""The demo's tissue classes and its class maps: the per-pixel truth every stage is checked against.

A class map is a uint8 PNG of indices into :data:`TISSUE_CLASSES` at 1/:data:`CLASS_MAP_DOWNSAMPLE` of
level 0, with the downsample and the class names in PNG text chunks so that the file explains itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from histoclip.store import atomic_path

#: Tissue classes; a class map stores the index into this tuple.
TISSUE_CLASSES: tuple[str, ...] = (
    "background",
    "adenocarcinoma",
    "squamous",
    "stroma",
    "necrosis",
    "lymphocytes",
    "fat",
)
#: Tumour classes used as slide labels (the sheet's ``label``); the second one carries the Cox effect.
SUBTYPES: tuple[str, ...] = ("adenocarcinoma", "squamous")

BACKGROUND, ADENOCARCINOMA, SQUAMOUS, STROMA, NECROSIS, LYMPHOCYTES, FAT = range(len(TISSUE_CLASSES))

#: Class maps are stored at 1/CLASS_MAP_DOWNSAMPLE of level 0; the full-resolution truth is exactly
#: this map with each value repeated CLASS_MAP_DOWNSAMPLE × CLASS_MAP_DOWNSAMPLE times.
CLASS_MAP_DOWNSAMPLE = 4


def write_class_map(path: Path, label: np.ndarray) -> None:
    """uint8 PNG of class indices; the downsample and class names travel in PNG text chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("histoclip.downsample", str(CLASS_MAP_DOWNSAMPLE))
    info.add_text("histoclip.classes", json.dumps(list(TISSUE_CLASSES)))
    with atomic_path(path) as tmp:
        Image.fromarray(label, mode="L").save(tmp, format="PNG", pnginfo=info)


def read_class_map(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """A class map and its downsample (level-0 px per map px), read from the PNG's text chunk."""
    with Image.open(path) as image:
        downsample = int(image.text.get("histoclip.downsample", CLASS_MAP_DOWNSAMPLE))
        label = np.asarray(image.convert("L") if image.mode != "L" else image).copy()
    return label, downsample


def tile_classes(
    class_map_path: str | os.PathLike[str],
    x: np.ndarray | Sequence[int] | int,
    y: np.ndarray | Sequence[int] | int,
    tile_level0_px: int,
) -> np.ndarray:
    """True tissue class (name) at the centre of each tile; x, y are level-0 top-left corners.

    The centre, not a majority vote, because that is what a user can check by eye on a thumbnail
    and what tiling code knows without reading pixels. Centres off the map count as background.
    """
    label, downsample = read_class_map(class_map_path)
    cx = (np.asarray(x, dtype=np.int64) + tile_level0_px // 2) // downsample
    cy = (np.asarray(y, dtype=np.int64) + tile_level0_px // 2) // downsample
    inside = (cx >= 0) & (cy >= 0) & (cx < label.shape[1]) & (cy < label.shape[0])
    index = np.zeros(np.broadcast(cx, cy).shape, np.int64)
    index[inside] = label[cy[inside], cx[inside]]
    return np.asarray(TISSUE_CLASSES)[index]  # a str array shaped like the broadcast of x and y
