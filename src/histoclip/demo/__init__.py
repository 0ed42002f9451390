"""The synthetic demo cohort (slides with known tissue classes, subtypes and simulated survival).

Only the demo rules, tests and benchmarks import this package; production code never does. What they use is
exported here; the modules, from the bottom up:

- :mod:`~histoclip.demo.classes` — tissue classes, subtypes and class maps (the per-pixel truth);
- :mod:`~histoclip.demo.tiff` — pyramidal TIFFs that OpenSlide opens, byte-identical for identical pixels;
- :mod:`~histoclip.demo.noise`, :mod:`~histoclip.demo.layout`, :mod:`~histoclip.demo.stain`,
  :mod:`~histoclip.demo.nuclei`, :mod:`~histoclip.demo.paint` — laying out and painting a slide;
- :mod:`~histoclip.demo.captions` — the tiles' captions and the class prompts they imply;
- :mod:`~histoclip.demo.survival_sim` — survival times from a known Cox model;
- :mod:`~histoclip.demo.cohort` — :func:`~histoclip.demo.cohort.make_demo_cohort`, the whole cohort;
- :mod:`~histoclip.demo.pairs` — tile–caption pairs for training the demo CLIP;
- :mod:`~histoclip.demo.large_slide` — a 100k-px slide for benchmarks.
"""

from histoclip.demo.captions import CAPTION_MIN_PURITY, CAPTION_TILE_UM, CLASS_SYNONYMS, prompts_from_synonyms
from histoclip.demo.classes import (
    CLASS_MAP_DOWNSAMPLE,
    SUBTYPES,
    TISSUE_CLASSES,
    read_class_map,
    tile_classes,
    write_class_map,
)
from histoclip.demo.cohort import DemoCohort, make_demo_cohort
from histoclip.demo.large_slide import write_large_slide
from histoclip.demo.pairs import demo_pairs
from histoclip.demo.survival_sim import TRUE_COEFFICIENTS
from histoclip.demo.tiff import write_pyramid_tiff

__all__ = [
    "CAPTION_MIN_PURITY",
    "CAPTION_TILE_UM",
    "CLASS_MAP_DOWNSAMPLE",
    "CLASS_SYNONYMS",
    "SUBTYPES",
    "TISSUE_CLASSES",
    "TRUE_COEFFICIENTS",
    "DemoCohort",
    "demo_pairs",
    "make_demo_cohort",
    "prompts_from_synonyms",
    "read_class_map",
    "tile_classes",
    "write_class_map",
    "write_large_slide",
    "write_pyramid_tiff",
]
