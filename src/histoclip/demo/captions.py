"""Captions of the demo cohort: the class synonyms, which tiles get a caption, and the class prompts they imply.

Captions are a template × a synonym of the tile's class (:data:`~histoclip.training.captions.CAPTION_TEMPLATES`
× :data:`CLASS_SYNONYMS`), so the prompts that name a class (:func:`prompts_from_synonyms`) are drawn from the
same product as the captions the demo CLIP is trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from histoclip.demo.classes import BACKGROUND, CLASS_MAP_DOWNSAMPLE, TISSUE_CLASSES
from histoclip.training.captions import CAPTION_TEMPLATES, draw_caption

#: Physical size of a caption tile: 224 px at 0.5 µm/px, the field of view CLIP tiles are cut at.
CAPTION_TILE_UM = 112.0
#: A tile is captioned only if at least this fraction of its area is one tissue class.
CAPTION_MIN_PURITY = 0.9

#: Several names per class, so a model learns the concept and not one string.
CLASS_SYNONYMS: dict[str, tuple[str, ...]] = {
    "adenocarcinoma": (
        "lung adenocarcinoma",
        "adenocarcinoma",
        "gland-forming adenocarcinoma",
        "glandular carcinoma",
    ),
    "squamous": (
        "squamous cell carcinoma",
        "keratinising squamous cell carcinoma",
        "squamous carcinoma",
        "lung squamous cell carcinoma",
    ),
    "stroma": ("tumour stroma", "fibrous stroma", "desmoplastic stroma", "collagenous connective tissue"),
    "necrosis": ("tumour necrosis", "necrotic tissue", "necrotic debris", "coagulative necrosis"),
    "lymphocytes": (
        "lymphocytes",
        "a lymphocytic infiltrate",
        "a lymphoid aggregate",
        "tumour-infiltrating lymphocytes",
    ),
    "fat": ("adipose tissue", "fat", "adipocytes", "fatty tissue"),
}


def caption_rows(
    rng: np.random.Generator, slide_id: str, label4: np.ndarray, mpp: float
) -> list[tuple[str, int, int, int, str, str]]:
    """Captions for tiles on a CAPTION_TILE_UM grid that are at least CAPTION_MIN_PURITY one class."""
    tile_px = int(round(CAPTION_TILE_UM / mpp))
    size = label4.shape[0] * CLASS_MAP_DOWNSAMPLE
    rows = []
    for y in range(0, size - tile_px + 1, tile_px):
        for x in range(0, size - tile_px + 1, tile_px):
            block = label4[
                y // CLASS_MAP_DOWNSAMPLE : -(-(y + tile_px) // CLASS_MAP_DOWNSAMPLE),
                x // CLASS_MAP_DOWNSAMPLE : -(-(x + tile_px) // CLASS_MAP_DOWNSAMPLE),
            ]
            counts = np.bincount(block.ravel(), minlength=len(TISSUE_CLASSES))
            cls = int(counts.argmax())
            if cls == BACKGROUND or counts[cls] < CAPTION_MIN_PURITY * block.size:
                continue
            name = TISSUE_CLASSES[cls]
            rows.append((slide_id, x, y, tile_px, name, draw_caption(rng, CLASS_SYNONYMS[name], CAPTION_TEMPLATES)))
    return rows


def prompts_from_synonyms(
    synonyms: Mapping[str, Sequence[str]] = CLASS_SYNONYMS, templates: Sequence[str] = CAPTION_TEMPLATES
) -> dict[str, list[str]]:
    """Per class, every template × synonym (the demo's captions are drawn from the same product)."""
    return {name: [t.format(s) for s in words for t in templates] for name, words in synonyms.items()}
