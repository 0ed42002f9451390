"""The coarse layout of a demo slide: a field of tissue with gaps of glass, then blob-shaped class regions (the class
map)."""

from __future__ import annotations

import math

import numpy as np

from histoclip.demo.classes import CLASS_MAP_DOWNSAMPLE, FAT, LYMPHOCYTES, NECROSIS, STROMA
from histoclip.demo.noise import smooth_noise, upsample

#: Correlation length (µm) of the fields that place stroma, necrosis, lymphocytes and fat. It sets the size of
#: the class regions: ~250 µm gives regions of roughly 0.5-1.5 mm, the scale of tumour nests, stroma bands,
#: necrotic foci and lymphoid aggregates in resections, so that about half of the 112 µm tiles are at least
#: 90 % one class, as in a real cohort. (It was 90 µm: regions of 200-500 µm, a third of the tiles that pure,
#: and phenotype agreement with the true classes bounded near the test's bar by the mixed tiles.)
REGION_CORRELATION_UM = 250.0

#: Share of the slide that is tissue (drawn per slide). A demo slide is a ~1 mm field of a resection, tissue
#: running to its border with glass in gaps and at the corners, so that, as on a whole slide, most tiles lie
#: inside tissue: about a fifth of the kept tiles touch glass. (Slides were tissue pieces in the middle of the
#: glass, 42-62 % tissue: on fields this small 40 % of the tiles then touched glass, those edge tiles formed a
#: phenotype of their own, and phenotype agreement with the true classes fell to near the test's bar.)
TISSUE_SHARE = (0.85, 0.95)


def slide_layout(
    rng: np.random.Generator, slide_px: int, mpp: float, necrosis_target: float, subtype: int
) -> np.ndarray:
    """The true class map at 1/CLASS_MAP_DOWNSAMPLE: the tissue of the field, then class regions.

    Class regions are superlevel sets of smooth random fields, allocated greedily by quantile so each
    class gets exactly its drawn share of the tissue (necrosis: ``necrosis_target``); the tumour
    subtype takes what is left.
    """
    m = slide_px // CLASS_MAP_DOWNSAMPLE
    g = max(slide_px // 16, 32)
    yy, xx = np.mgrid[0:g, 0:g].astype(np.float32) / g
    field = np.zeros((g, g), np.float32)
    n_pieces = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    for _ in range(n_pieces):
        cy, cx = rng.uniform(0.3, 0.7, 2) if n_pieces == 1 else rng.uniform(0.22, 0.78, 2)
        ry, rx = rng.uniform(0.16, 0.3, 2) / math.sqrt(n_pieces) * 1.2
        a = rng.uniform(0, np.pi)
        u = (yy - cy) * math.cos(a) + (xx - cx) * math.sin(a)
        v = -(yy - cy) * math.sin(a) + (xx - cx) * math.cos(a)
        field += np.exp(-0.5 * ((u / ry) ** 2 + (v / rx) ** 2))
    field += 0.22 * smooth_noise(rng, (g, g), g / 14)
    fine = upsample(field, (m, m))
    tissue_target = rng.uniform(*TISSUE_SHARE)
    tissue = fine > np.quantile(fine, 1 - tissue_target)

    label = np.zeros((m, m), np.uint8)
    label[tissue] = subtype
    remaining = tissue.copy()
    n_tissue = int(tissue.sum())
    region_sigma = REGION_CORRELATION_UM / (16 * mpp) * (slide_px / 16) / g  # in cells of the coarse grid
    # Fat, lymphocytes and stroma are shares of the viable (non-necrotic) tissue, so a slide with extensive
    # necrosis still has tumour to call its subtype from (tumour: 55-74 % of the viable tissue).
    viable = 1.0 - necrosis_target
    shares = [
        (NECROSIS, necrosis_target),
        (FAT, viable * rng.uniform(0.05, 0.1)),
        (LYMPHOCYTES, viable * rng.uniform(0.07, 0.13)),
        (STROMA, viable * rng.uniform(0.14, 0.22)),
    ]
    for cls, share in shares:
        k = int(round(share * n_tissue))
        if k <= 0:
            continue
        class_field = upsample(smooth_noise(rng, (g, g), region_sigma), (m, m))
        values = class_field[remaining]
        if k >= values.size:
            chosen = remaining.copy()
        else:
            threshold = np.partition(values, values.size - k)[values.size - k]
            chosen = remaining & (class_field >= threshold)
        label[chosen] = cls
        remaining &= ~chosen
    return label
