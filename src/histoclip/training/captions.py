"""Captions made from class phrases: a template × a phrase, as the demo cohort's captions and image-folder pairs are.

Torch-free, so that the demo cohort (which captions its tiles the same way) can use it without the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Caption templates; ``{}`` is replaced by a phrase (e.g. a synonym of the class).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "an H&E image of {}.",
    "a histopathology image of {}.",
    "an H&E-stained tile showing {}.",
    "a photomicrograph of {}.",
    "{}.",
    "presence of {}.",
)


def draw_caption(rng: np.random.Generator, phrases: Sequence[str], templates: Sequence[str]) -> str:
    """A random template filled with a random phrase (drawn in that order), first letter capitalised."""
    text = templates[int(rng.integers(len(templates)))].format(phrases[int(rng.integers(len(phrases)))])
    return text[0].upper() + text[1:]
