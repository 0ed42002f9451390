"""The demo's tissue classes and its class maps: the per-pixel truth every stage is checked against.

A class map is a uint8 PNG of indices into :data:`TISSUE_CLASSES` at 1/:data:`CLASS_MAP_DOWNSAMPLE` of
level 0, with the downsample and the class names in PNG text chunks so that the file explains itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoclip import formats
from histoclip.formats import read_class_map, tile_classes

__all__ = [
    "ADENOCARCINOMA",
    "BACKGROUND",
    "CLASS_MAP_DOWNSAMPLE",
    "FAT",
    "LYMPHOCYTES",
    "NECROSIS",
    "SQUAMOUS",
    "STROMA",
    "SUBTYPES",
    "TISSUE_CLASSES",
    "read_class_map",
    "tile_classes",
    "write_class_map",
]

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
    """The demo's class map, in the format :mod:`histoclip.formats.class_maps` owns (its reader is
    :func:`histoclip.formats.read_class_map`, re-exported here)."""
    formats.write_class_map(path, label, CLASS_MAP_DOWNSAMPLE, TISSUE_CLASSES)
