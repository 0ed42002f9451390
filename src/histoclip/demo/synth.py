"""A deterministic synthetic demo cohort of H&E-like whole-slide images with known ground truth.

Why synthetic: the demo and the end-to-end tests must run offline in minutes on two CPU cores, with no
patient data and no downloaded weights, and every stage of the workflow must be checkable against a
truth that is known exactly: the tissue class of every pixel (class maps), the subtype of every slide
(the sheet's ``label``), and the Cox model that generated the survival times (``true_coefficients.tsv``).

How: each slide is laid out at a coarse resolution (tissue pieces on glass, then blob-shaped regions of
tumour, stroma, necrosis, lymphocytes and fat) and then painted as two stain layers, haematoxylin and
eosin, in optical density. Structures larger than a few µm are computed at half resolution; nuclei are
stamped at full resolution from small precomputed sprites; Beer-Lambert turns the two layers into RGB
through a per-slide lookup table (which is also where the per-slide stain colour jitter lives). All sizes
are in µm and converted with the slide's mpp, so a slide written at another resolution shows the same
tissue at another pixel scale. Everything comes from ``numpy.random.default_rng`` streams derived from
one seed, and nothing time- or machine-dependent is written, so two runs give byte-identical files.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pandas as pd
import tifffile
from PIL import Image, PngImagePlugin
from scipy import ndimage as ndi

from histoclip.store import atomic_path

__all__ = [
    "CAPTION_TEMPLATES",
    "CLASS_MAP_DOWNSAMPLE",
    "CLASS_SYNONYMS",
    "SUBTYPES",
    "TISSUE_CLASSES",
    "TRUE_COEFFICIENTS",
    "DemoCohort",
    "make_demo_cohort",
    "read_class_map",
    "tile_classes",
    "write_large_slide",
    "write_pyramid_tiff",
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
#: Caption templates; ``{}`` is replaced by a synonym.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "an H&E image of {}.",
    "a histopathology image of {}.",
    "an H&E-stained tile showing {}.",
    "a photomicrograph of {}.",
    "{}.",
    "presence of {}.",
)

#: Log hazard ratios of the simulated Cox model, keyed by the clinical.tsv column they apply to.
TRUE_COEFFICIENTS: dict[str, float] = {
    "subtype_squamous": 1.2,
    "necrosis_fraction": 3.0,
    "age": 0.04,
}
_COEFFICIENT_DESCRIPTIONS = {
    "subtype_squamous": "log hazard ratio of squamous vs adenocarcinoma; subtype_squamous = 1 if subtype is "
    "squamous else 0",
    "necrosis_fraction": "log hazard ratio per unit of necrosis fraction of tissue (0-1; +0.1 -> x exp(0.3)); "
    "patient value = tissue-area-weighted mean over the patient's slides, as measured on the class maps",
    "age": "log hazard ratio per year of age (0.4 per decade); age in years at diagnosis",
}
#: Weibull baseline: shape, and median survival (months) of an adenocarcinoma patient aged 60, no necrosis.
WEIBULL_SHAPE = 1.3
BASELINE_MEDIAN_MONTHS = 48.0
#: Fraction of patients censored (independent exponential drop-out, one rate calibrated per cohort).
CENSORED_FRACTION = 0.3

_OD_SCALE = 100.0  # stain layers are stored as uint8 optical density × 100 (0.01 OD per step)
_SAFE_ID = "[A-Za-z0-9._-]+"


# --------------------------------------------------------------------------------------------------
# Files


def _write_tsv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, lineterminator="\n", float_format="%.6g")


def _tiff_resolution(mpp: float | None) -> dict[str, Any]:
    """Resolution keywords for tifffile: pixels per centimetre, which OpenSlide turns into mpp.

    Without an mpp, tifffile still writes the baseline XResolution/YResolution tags (1/1) but with
    ResolutionUnit NONE, which no reader converts into a physical size.
    """
    if mpp is None:
        return {}
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    px_per_cm = 1e4 / mpp
    return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}


def _jpeg_options(quality: int) -> dict[str, Any]:
    return {"compression": "jpeg", "compressionargs": {"level": int(quality)}, "photometric": "rgb"}


def _encode_jpeg_tile(tile_rgb: np.ndarray, quality: int) -> bytes:
    """Encode one tile exactly as tifffile does for ``compression='jpeg', photometric='rgb'``.

    tifffile stores such tiles as YCbCr with 2×2 chroma subsampling; pre-encoded tiles must match.
    """
    return imagecodecs.jpeg8_encode(
        tile_rgb, level=int(quality), subsampling=(2, 2), colorspace="RGB", outcolorspace="YCBCR"
    )


def _reduce(image: Image.Image, factor: int) -> Image.Image:
    """Area-average downsampling (a partial edge block averages the pixels it has)."""
    return image if factor == 1 else image.reduce(factor)


def write_pyramid_tiff(
    path: str | os.PathLike[str],
    level0_rgb: np.ndarray,
    *,
    mpp: float | None,
    downsamples: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    quality: int = 90,
) -> None:
    """Write an RGB image as a pyramidal JPEG-tiled TIFF that OpenSlide opens as ``generic-tiff``.

    One page per level (successive pages, not SubIFDs, which OpenSlide does not see), reduced levels
    marked ``subfiletype=1`` and made by area averaging. ``mpp`` becomes the resolution in pixels per
    centimetre, which OpenSlide reports as ``openslide.mpp-x``/``-y``; ``mpp=None`` writes no physical
    resolution (unit NONE), the "slide without mpp" case. No DateTime tag and a fixed Software tag, so
    the file is byte-identical for identical pixels. Written to a temporary file and renamed.
    """
    rgb = np.asarray(level0_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"level0_rgb must be a (height, width, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
    ds = [int(d) for d in downsamples]
    if not ds or ds[0] != 1 or any(b <= a for a, b in zip(ds, ds[1:], strict=False)):
        raise ValueError(f"downsamples must start at 1 and increase, got {tuple(downsamples)}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 (JPEG MCU), got {tile}")
    options = {**_jpeg_options(quality), **_tiff_resolution(mpp)}
    level0 = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tw:
        previous, previous_ds = level0, 1
        for i, d in enumerate(ds):
            # Reduce from the previous level when the factor divides (cheaper, same area average).
            image = _reduce(previous, d // previous_ds) if d % previous_ds == 0 else _reduce(level0, d)
            tw.write(
                np.asarray(image),
                tile=(tile, tile),
                subfiletype=1 if i else 0,
                metadata=None,
                software="histoclip.synth",
                maxworkers=1,
                **options,
            )
            previous, previous_ds = image, d


# --------------------------------------------------------------------------------------------------
# Noise and geometry helpers


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation (float32)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    std = float(field.std())
    return field / std if std > 0 else field


def _upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float32 field (PIL is much faster than scipy.ndimage.zoom here)."""
    image = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def _upsample_u8(layer: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(np.ascontiguousarray(layer), mode="L")
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def _worley(
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


def _ellipse_sprite(
    rng: np.random.Generator,
    semi_long: float,
    semi_short: float,
    angle: float,
    od: float,
    *,
    vesicular: float = 0.0,
    wobble: float = 0.08,
    texture: float = 0.12,
) -> np.ndarray:
    """A nucleus as a uint8 haematoxylin-OD sprite: a soft-edged, slightly irregular ellipse.

    ``vesicular`` > 0 lightens the centre relative to the rim (open chromatin, as in squamous
    carcinoma) and adds a nucleolus. Sprites are precomputed per slide and stamped many times, which is
    what makes drawing ~10^4 nuclei per slide cheap.
    """
    half = int(math.ceil(semi_long * (1 + wobble) + 1.5))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    ca, sa = math.cos(angle), math.sin(angle)
    u = xx * ca + yy * sa
    v = -xx * sa + yy * ca
    phi = np.arctan2(v, u)
    shape = (
        1
        + wobble * np.sin(2 * phi + rng.uniform(0, 2 * np.pi))
        + 0.5 * wobble * np.sin(3 * phi + rng.uniform(0, 2 * np.pi))
    )
    rr = np.sqrt((u / semi_long) ** 2 + (v / semi_short) ** 2) / shape
    alpha = np.clip((1 - rr) * semi_short + 0.5, 0, 1)
    level = od * (1 + texture * rng.standard_normal(rr.shape).astype(np.float32))
    if vesicular:
        level = level * (1 - vesicular * np.clip(1 - rr**2, 0, 1) ** 2)
        ny, nx = rng.uniform(-0.3, 0.3, 2) * semi_short
        nucleolus = np.exp(-((yy - ny) ** 2 + (xx - nx) ** 2) / (2 * (0.16 * semi_short + 0.4) ** 2))
        level = np.maximum(level, od * 1.1 * nucleolus)
    return np.clip(level * alpha * _OD_SCALE, 0, 255).astype(np.uint8)


def _stamp(
    canvas: np.ndarray, pad: int, ys: np.ndarray, xs: np.ndarray, sprites: list[np.ndarray], which: np.ndarray
) -> None:
    """Stamp sprites (max-compositing) centred on (ys, xs) into a canvas padded by ``pad`` pixels."""
    for y, x, k in zip(ys.tolist(), xs.tolist(), which.tolist(), strict=True):
        sprite = sprites[k]
        h, w = sprite.shape
        y0 = y + pad - h // 2
        x0 = x + pad - w // 2
        view = canvas[y0 : y0 + h, x0 : x0 + w]
        np.maximum(view, sprite, out=view)


# --------------------------------------------------------------------------------------------------
# Slide layout (coarse) and painting (fine)


def _layout(rng: np.random.Generator, slide_px: int, mpp: float, necrosis_target: float, subtype: int) -> np.ndarray:
    """The true class map at 1/CLASS_MAP_DOWNSAMPLE: tissue pieces on glass, then class regions.

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
    field += 0.22 * _smooth_noise(rng, (g, g), g / 14)
    edge = np.minimum(np.minimum(yy, 1 - yy), np.minimum(xx, 1 - xx))
    field *= np.clip(edge / 0.08, 0, 1)
    fine = _upsample(field, (m, m))
    tissue_target = rng.uniform(0.42, 0.62)
    tissue = fine > np.quantile(fine, 1 - tissue_target)

    label = np.zeros((m, m), np.uint8)
    label[tissue] = subtype
    remaining = tissue.copy()
    n_tissue = int(tissue.sum())
    region_sigma = 90.0 / (16 * mpp) * (slide_px / 16) / g  # ~90 µm correlation -> blobs of 200-500 µm
    shares = [
        (NECROSIS, necrosis_target),
        (FAT, rng.uniform(0.05, 0.1)),
        (LYMPHOCYTES, rng.uniform(0.07, 0.13)),
        (STROMA, rng.uniform(0.14, 0.22)),
    ]
    for cls, share in shares:
        k = int(round(share * n_tissue))
        if k <= 0:
            continue
        class_field = _upsample(_smooth_noise(rng, (g, g), region_sigma), (m, m))
        values = class_field[remaining]
        if k >= values.size:
            chosen = remaining.copy()
        else:
            threshold = np.partition(values, values.size - k)[values.size - k]
            chosen = remaining & (class_field >= threshold)
        label[chosen] = cls
        remaining &= ~chosen
    return label


@dataclass(frozen=True)
class _Stain:
    """Per-slide stain: OD per unit of haematoxylin and eosin in R, G, B, plus glass OD."""

    h: np.ndarray
    e: np.ndarray
    glass: np.ndarray

    @staticmethod
    def random(rng: np.random.Generator) -> _Stain:
        h = np.array([0.80, 0.95, 0.36]) * (1 + rng.normal(0, 0.05, 3)) * rng.uniform(0.88, 1.12)
        e = np.array([0.14, 1.00, 0.42]) * (1 + rng.normal(0, 0.06, 3)) * rng.uniform(0.85, 1.15)
        glass = np.full(3, rng.uniform(0.012, 0.03)) + rng.normal(0, 0.004, 3)
        return _Stain(h=h, e=e, glass=np.clip(glass, 0, None))

    def lut(self) -> np.ndarray:
        """(65536, 3) uint8 Beer-Lambert table indexed by ``(H_od8 << 8) | E_od8``."""
        levels = np.arange(256, dtype=np.float64) / _OD_SCALE
        od = levels[:, None, None] * self.h + levels[None, :, None] * self.e + self.glass
        return np.clip(255 * np.exp(-od) + 0.5, 0, 255).astype(np.uint8).reshape(65536, 3)


@dataclass
class _Fields:
    """Per-pixel inputs of the class painters for one class's pixels (positions in µm)."""

    y: np.ndarray
    x: np.ndarray
    grain: np.ndarray  # white noise, ~1 µm
    mid: np.ndarray  # ~5 µm blotches
    low: np.ndarray  # ~100 µm drift


@dataclass
class _Nuclei:
    """Nuclei to stamp at full resolution: centres (level-0 px) and sprite indices into a bank."""

    ys: np.ndarray
    xs: np.ndarray
    which: np.ndarray
    bank: list[np.ndarray]


def _paint_stroma(f: _Fields, theta: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Wavy eosinophilic collagen fibres: stripes along one direction, bent by low-frequency noise."""
    ct, st = math.cos(theta), math.sin(theta)
    u = f.x * ct + f.y * st
    v = -f.x * st + f.y * ct
    wave = v + 3.0 * np.sin(u * (2 * np.pi / 45) + rng.uniform(0, 2 * np.pi)) + 14 * f.low + 1.6 * f.mid
    fibres = (0.5 + 0.5 * np.sin(wave * (2 * np.pi / 4.2))) ** 3
    bundles = 0.5 + 0.5 * np.sin(wave * (2 * np.pi / 17.0) + 1.3 * f.mid)
    gaps = np.clip(0.8 + 0.45 * f.mid, 0.3, 1)
    e = (0.2 + 0.22 * bundles + 0.3 * fibres) * gaps + 0.03 * f.grain
    h = 0.045 + 0.012 * f.grain
    return h, e


def _paint_adenocarcinoma(f: _Fields, glands: dict[str, np.ndarray], cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Glands: white lumens ringed by amphophilic epithelium, in pale desmoplastic stroma."""
    gy = (f.y // cell).astype(np.int32)
    gx = (f.x // cell).astype(np.int32)
    dy = f.y - glands["cy"][gy, gx]
    dx = f.x - glands["cx"][gy, gx]
    ang = glands["angle"][gy, gx]
    ca, sa = np.cos(ang), np.sin(ang)
    p = dx * ca + dy * sa
    q = -dx * sa + dy * ca
    a = glands["a"][gy, gx]
    b = glands["b"][gy, gx]
    phi = np.arctan2(q / b, p / a)
    wob = 1 + 0.12 * np.sin(3 * phi + glands["psi1"][gy, gx]) + 0.07 * np.sin(5 * phi + glands["psi2"][gy, gx])
    rr = np.sqrt((p / a) ** 2 + (q / b) ** 2) / wob
    present = glands["present"][gy, gx]
    lumen = present & (rr < glands["lumen"][gy, gx])
    epithelium = present & ~lumen & (rr < 1.0)
    h = np.where(epithelium, 0.24, 0.05).astype(np.float32) + 0.02 * f.grain
    stripes = 0.5 + 0.5 * np.sin((f.y * 0.6 + f.x * 0.8 + 10 * f.low + 1.5 * f.mid) * (2 * np.pi / 7))
    e = np.where(epithelium, 0.30 + 0.05 * f.mid, 0.24 + 0.16 * stripes) + 0.03 * f.grain
    secretion = glands["secretion"][gy, gx]
    h = np.where(lumen, 0.005, h)
    e = np.where(lumen, secretion * (0.6 + 0.4 * np.clip(f.mid, -1, 1)), e)
    return h, e


def _paint_squamous(f: _Fields, rng: np.random.Generator, cell: float) -> tuple[np.ndarray, np.ndarray, Any]:
    """Sheets of polygonal cells with glassy pink cytoplasm and faint borders (Voronoi membranes)."""
    border_dist, seed_y, seed_x = _worley(f.y, f.x, cell, rng)
    border = np.exp(-((border_dist / 1.4) ** 2))
    e = 0.50 + 0.05 * f.mid + 0.03 * f.grain - 0.22 * border
    h = 0.09 + 0.10 * border + 0.015 * f.grain
    return h, e, (seed_y, seed_x)


def _paint_necrosis(f: _Fields) -> tuple[np.ndarray, np.ndarray]:
    """Pale, granular pink debris with a smudgy purple haze (nuclear dust is stamped later)."""
    e = 0.22 + 0.08 * f.mid + 0.06 * f.grain + 0.03 * f.low
    h = 0.07 + 0.045 * np.clip(-f.mid, -0.5, 2) + 0.03 * f.grain
    return h, e


def _paint_lymphocytes(f: _Fields) -> tuple[np.ndarray, np.ndarray]:
    """Scant cytoplasm between densely packed lymphocyte nuclei (stamped later)."""
    e = 0.13 + 0.03 * f.mid + 0.02 * f.grain
    h = 0.16 + 0.03 * f.mid + 0.02 * f.grain
    return h, e


def _paint_fat(f: _Fields, rng: np.random.Generator, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Adipocytes: large empty polygons bounded by thin pink membranes."""
    border_dist, _, _ = _worley(f.y, f.x, cell, rng)
    membrane = np.exp(-((border_dist / 1.1) ** 2))
    e = 0.42 * membrane + 0.004 * f.grain
    h = 0.05 * membrane
    return h, e


def _sample_positions(
    rng: np.random.Generator, label4: np.ndarray, cls: int, spacing_px: float, jitter: float, keep: float
) -> tuple[np.ndarray, np.ndarray]:
    """Jittered-grid positions (level-0 px) that fall on class ``cls``: dense, non-clumping nuclei."""
    size = label4.shape[0] * CLASS_MAP_DOWNSAMPLE
    n = int(size // spacing_px) + 1
    gy, gx = np.mgrid[0:n, 0:n].astype(np.float32) * spacing_px
    ys = gy.ravel() + rng.uniform(-jitter, jitter, gy.size).astype(np.float32) * spacing_px
    xs = gx.ravel() + rng.uniform(-jitter, jitter, gx.size).astype(np.float32) * spacing_px
    ys = np.clip(np.rint(ys), 0, size - 1).astype(np.int64)
    xs = np.clip(np.rint(xs), 0, size - 1).astype(np.int64)
    on = label4[ys // CLASS_MAP_DOWNSAMPLE, xs // CLASS_MAP_DOWNSAMPLE] == cls
    on &= rng.random(on.size) < keep
    return ys[on], xs[on]


def _on_class(label4: np.ndarray, ys: np.ndarray, xs: np.ndarray, cls: int) -> np.ndarray:
    size = label4.shape[0] * CLASS_MAP_DOWNSAMPLE
    inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    ok = np.zeros(ys.shape, bool)
    ok[inside] = label4[ys[inside] // CLASS_MAP_DOWNSAMPLE, xs[inside] // CLASS_MAP_DOWNSAMPLE] == cls
    return ok


def _oriented_bank(
    rng: np.random.Generator, semi_long: float, semi_short: float, od: float, n_angles: int = 16, **kw: Any
) -> list[np.ndarray]:
    """Sprites at ``n_angles`` orientations over [0, pi), two shape variants each (index = 2*bin+v)."""
    bank = []
    for i in range(n_angles):
        for _ in range(2):
            jitter = rng.uniform(0.85, 1.15)
            bank.append(_ellipse_sprite(rng, semi_long * jitter, semi_short * jitter, i * np.pi / n_angles, od, **kw))
    return bank


def _angle_index(rng: np.random.Generator, angles: np.ndarray, n_angles: int = 16) -> np.ndarray:
    bins = np.rint(np.mod(angles, np.pi) / (np.pi / n_angles)).astype(np.int64) % n_angles
    return 2 * bins + rng.integers(0, 2, bins.size)


def _render_slide(rng: np.random.Generator, label4: np.ndarray, mpp: float, stain: _Stain) -> np.ndarray:
    """Paint the level-0 RGB image (uint8, slide_px²) of a layout."""
    m = label4.shape[0]
    size = m * CLASS_MAP_DOWNSAMPLE
    half = size // 2
    um_half = 2 * mpp  # µm per half-resolution pixel
    scale = rng.uniform(0.9, 1.1)  # per-slide size jitter of every structure
    px = 1.0 / mpp  # level-0 px per µm

    label2 = np.repeat(np.repeat(label4, 2, axis=0), 2, axis=1)
    grain = rng.standard_normal(half * half, dtype=np.float32)
    mid_shape = (max(half // 4, 8), max(half // 4, 8))
    mid = _upsample(_smooth_noise(rng, mid_shape, 1.4 * 0.5 / mpp), (half, half)).ravel()
    low_shape = (max(half // 32, 8), max(half // 32, 8))
    low = _upsample(_smooth_noise(rng, low_shape, 3.0 * 0.5 / mpp), (half, half)).ravel()

    h_half = np.zeros(half * half, np.float32)
    e_half = np.zeros(half * half, np.float32)
    flat_label = label2.ravel()
    present = np.bincount(flat_label, minlength=len(TISSUE_CLASSES)) > 0
    nuclei: list[_Nuclei] = []
    theta = rng.uniform(0, np.pi)

    for cls in range(1, len(TISSUE_CLASSES)):
        if not present[cls]:
            continue
        idx = np.flatnonzero(flat_label == cls)
        f = _Fields(
            y=(idx // half).astype(np.float32) * um_half,
            x=(idx % half).astype(np.float32) * um_half,
            grain=grain[idx],
            mid=mid[idx],
            low=low[idx],
        )
        if cls == STROMA:
            h, e = _paint_stroma(f, theta, rng)
            ys, xs = _sample_positions(rng, label4, STROMA, 26 * scale * px, 0.45, 0.55)
            bank = _oriented_bank(rng, 6.0 * scale * px, 1.3 * scale * px, 1.05)
            angles = np.full(ys.size, theta) + rng.normal(0, 0.15, ys.size)
            nuclei.append(_Nuclei(ys, xs, _angle_index(rng, angles), bank))
        elif cls == ADENOCARCINOMA:
            cell = 52.0 * scale
            glands = _gland_grid(rng, size * mpp, cell)
            h, e = _paint_adenocarcinoma(f, glands, cell)
            nuclei.append(_gland_nuclei(rng, glands, label4, mpp, scale))
        elif cls == SQUAMOUS:
            cell = 15.0 * scale
            h, e, (seed_y, seed_x) = _paint_squamous(f, rng, cell)
            h, e, pearls = _keratin_pearls(rng, f, h, e, scale, um_half)
            nuclei.append(_squamous_nuclei(rng, seed_y, seed_x, pearls, label4, mpp, scale))
        elif cls == NECROSIS:
            h, e = _paint_necrosis(f)
            ys, xs = _sample_positions(rng, label4, NECROSIS, 6.5 * scale * px, 0.5, 0.6)
            bank = [
                _ellipse_sprite(rng, r * px, r * rng.uniform(0.5, 1) * px, rng.uniform(0, np.pi), od, wobble=0.3)
                for r, od in zip(rng.uniform(0.5, 1.6, 24), rng.uniform(0.9, 1.5, 24), strict=True)
            ]
            ghosts = [
                _ellipse_sprite(rng, 4.2 * scale * px, 3.6 * scale * px, rng.uniform(0, np.pi), 0.3, vesicular=0.6)
                for _ in range(4)
            ]
            gy, gx = _sample_positions(rng, label4, NECROSIS, 24 * scale * px, 0.45, 0.5)
            nuclei.append(_Nuclei(ys, xs, rng.integers(0, len(bank), ys.size), bank))
            nuclei.append(_Nuclei(gy, gx, rng.integers(0, len(ghosts), gy.size), ghosts))
        elif cls == LYMPHOCYTES:
            h, e = _paint_lymphocytes(f)
            ys, xs = _sample_positions(rng, label4, LYMPHOCYTES, 7.6 * scale * px, 0.3, 0.9)
            bank = [
                _ellipse_sprite(rng, r * px, r * rng.uniform(0.82, 1.0) * px, rng.uniform(0, np.pi), od, wobble=0.06)
                for r, od in zip(rng.uniform(2.6, 3.3, 16) * scale, rng.uniform(1.35, 1.7, 16), strict=True)
            ]
            nuclei.append(_Nuclei(ys, xs, rng.integers(0, len(bank), ys.size), bank))
        else:  # FAT
            h, e = _paint_fat(f, rng, 48.0 * scale)
        h_half[idx] = h
        e_half[idx] = e

    # Quantise to uint8 OD (0.01 steps) with a little dither, then bring to level 0.
    dither = 0.5 + 0.35 * grain
    h8 = np.clip(h_half * _OD_SCALE + dither, 0, 255).astype(np.uint8).reshape(half, half)
    e8 = np.clip(e_half * _OD_SCALE + dither, 0, 255).astype(np.uint8).reshape(half, half)
    pad = max((max(s.shape) // 2 + 1 for n in nuclei for s in n.bank), default=1)
    h_full = np.zeros((size + 2 * pad, size + 2 * pad), np.uint8)
    h_full[pad:-pad, pad:-pad] = _upsample_u8(h8, (size, size))
    for n in nuclei:
        _stamp(h_full, pad, n.ys, n.xs, n.bank, n.which)
    e_full = _upsample_u8(e8, (size, size))
    index = h_full[pad:-pad, pad:-pad].astype(np.uint16) << 8
    index |= e_full
    return np.take(stain.lut(), index, axis=0)


def _gland_grid(rng: np.random.Generator, extent_um: float, cell: float) -> dict[str, np.ndarray]:
    """One candidate gland per grid cell, kept inside its cell so glands never collide."""
    n = int(extent_um // cell) + 2
    a = rng.uniform(0.36, 0.5, (n, n)) * cell
    b = a * rng.uniform(0.55, 1.0, (n, n))
    margin = cell / 2 - a * 1.1
    cy = (np.arange(n)[:, None] + 0.5) * cell + rng.uniform(-1, 1, (n, n)) * np.clip(margin, 0, None)
    cx = (np.arange(n)[None, :] + 0.5) * cell + rng.uniform(-1, 1, (n, n)) * np.clip(margin, 0, None)
    return {
        "cy": cy.astype(np.float32),
        "cx": cx.astype(np.float32),
        "a": a.astype(np.float32),
        "b": b.astype(np.float32),
        "angle": rng.uniform(0, np.pi, (n, n)).astype(np.float32),
        "lumen": rng.uniform(0.35, 0.6, (n, n)).astype(np.float32),
        "psi1": rng.uniform(0, 2 * np.pi, (n, n)).astype(np.float32),
        "psi2": rng.uniform(0, 2 * np.pi, (n, n)).astype(np.float32),
        "present": rng.random((n, n)) < 0.88,
        "secretion": np.where(rng.random((n, n)) < 0.3, rng.uniform(0.05, 0.14, (n, n)), 0.0).astype(np.float32),
    }


def _gland_nuclei(
    rng: np.random.Generator, glands: dict[str, np.ndarray], label4: np.ndarray, mpp: float, scale: float
) -> _Nuclei:
    """A single layer of columnar nuclei around each lumen, long axes pointing at the gland centre."""
    px = 1.0 / mpp
    sel = np.flatnonzero(glands["present"].ravel())
    g = {k: v.ravel()[sel] for k, v in glands.items()}
    perimeter = 2 * np.pi * np.sqrt((g["a"] ** 2 + g["b"] ** 2) / 2)
    counts = np.maximum((perimeter * 0.75 / (4.6 * scale)).astype(np.int64), 6)
    owner = np.repeat(np.arange(sel.size), counts)
    start = np.repeat(np.cumsum(counts) - counts, counts)
    phi = (np.arange(owner.size) - start) / counts[owner] * 2 * np.pi + rng.normal(0, 0.04, owner.size)
    phi += rng.uniform(0, 2 * np.pi, sel.size)[owner]
    wob = 1 + 0.12 * np.sin(3 * phi + g["psi1"][owner]) + 0.07 * np.sin(5 * phi + g["psi2"][owner])
    radial = (g["lumen"][owner] + (1 - g["lumen"][owner]) * rng.uniform(0.4, 0.62, owner.size)) * wob
    p = g["a"][owner] * radial * np.cos(phi)
    q = g["b"][owner] * radial * np.sin(phi)
    ang = g["angle"][owner]
    ys = g["cy"][owner] + p * np.sin(ang) + q * np.cos(ang)
    xs = g["cx"][owner] + p * np.cos(ang) - q * np.sin(ang)
    orientation = np.arctan2(ys - g["cy"][owner], xs - g["cx"][owner])
    ys = np.rint(ys * px).astype(np.int64)
    xs = np.rint(xs * px).astype(np.int64)
    ok = _on_class(label4, ys, xs, ADENOCARCINOMA)
    bank = _oriented_bank(rng, 4.6 * scale * px, 2.4 * scale * px, 1.2)
    return _Nuclei(ys[ok], xs[ok], _angle_index(rng, orientation[ok]), bank)


def _keratin_pearls(
    rng: np.random.Generator, f: _Fields, h: np.ndarray, e: np.ndarray, scale: float, um_half: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keratin pearls: concentric lamellae of bright eosinophilic keratin with a rim of flattened cells.

    Returns the painted layers and the pearls as rows (y, x, radius) in µm, so no nucleus is placed
    inside one. ``f.y`` is sorted (pixels come in row-major order), so each pearl only touches the rows
    it spans.
    """
    n_pix = f.y.size
    if n_pix == 0:
        return h, e, np.zeros((0, 3))
    area_um2 = n_pix * um_half**2
    n = int(rng.poisson(area_um2 / (170.0 * scale) ** 2 * 0.9))
    pearls = np.zeros((n, 3))
    for i in range(n):
        k = int(rng.integers(0, n_pix))
        cy, cx = float(f.y[k]), float(f.x[k])
        radius = rng.uniform(18, 40) * scale
        pearls[i] = cy, cx, radius
        lo, hi = np.searchsorted(f.y, [cy - radius * 1.05, cy + radius * 1.05])
        dy, dx = f.y[lo:hi] - cy, f.x[lo:hi] - cx
        phi = np.arctan2(dy, dx)
        wobble = 1 + 0.1 * np.sin(2 * phi + rng.uniform(0, 6.3)) + 0.06 * np.sin(3 * phi + rng.uniform(0, 6.3))
        rho = np.hypot(dy, dx) / wobble
        inside = rho < radius
        rel = rho[inside] / radius
        lamellae = np.sin(rho[inside] * (2 * np.pi / 4.5) + 0.6 * phi[inside] + f.mid[lo:hi][inside]) ** 2
        e[lo:hi][inside] = 0.62 + 0.22 * lamellae * (1 - 0.4 * rel) + 0.03 * f.grain[lo:hi][inside]
        h[lo:hi][inside] = 0.02 + 0.35 * np.exp(-(((rel - 0.9) / 0.06) ** 2))
    return h, e, pearls


def _squamous_nuclei(
    rng: np.random.Generator,
    seed_y: np.ndarray,
    seed_x: np.ndarray,
    pearls: np.ndarray,
    label4: np.ndarray,
    mpp: float,
    scale: float,
) -> _Nuclei:
    """One large vesicular nucleus near the centre of each polygonal cell, none inside keratin pearls."""
    px = 1.0 / mpp
    sy = seed_y.ravel() + rng.normal(0, 0.8, seed_y.size)
    sx = seed_x.ravel() + rng.normal(0, 0.8, seed_x.size)
    ok = rng.random(sy.size) < 0.92
    for cy, cx, radius in pearls:
        ok &= (sy - cy) ** 2 + (sx - cx) ** 2 > (radius * 1.2 + 2.5) ** 2
    ys = np.rint(sy * px).astype(np.int64)
    xs = np.rint(sx * px).astype(np.int64)
    ok &= _on_class(label4, ys, xs, SQUAMOUS)
    bank = [
        _ellipse_sprite(
            rng, r * px, r * rng.uniform(0.72, 0.95) * px, rng.uniform(0, np.pi), od, vesicular=0.5, wobble=0.1
        )
        for r, od in zip(rng.uniform(4.0, 5.4, 24) * scale, rng.uniform(0.95, 1.25, 24), strict=True)
    ]
    return _Nuclei(ys[ok], xs[ok], rng.integers(0, len(bank), int(ok.sum())), bank)


# --------------------------------------------------------------------------------------------------
# Class maps and captions


def _write_class_map(path: Path, label: np.ndarray) -> None:
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


def _caption_rows(
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
            synonyms = CLASS_SYNONYMS[name]
            template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
            text = template.format(synonyms[int(rng.integers(len(synonyms)))])
            rows.append((slide_id, x, y, tile_px, name, text[0].upper() + text[1:]))
    return rows


# --------------------------------------------------------------------------------------------------
# The cohort


@dataclass(frozen=True)
class DemoCohort:
    """Paths of what :func:`make_demo_cohort` wrote (all inside ``root``)."""

    root: Path
    sheet: Path
    clinical: Path
    coefficients: Path
    captions: Path
    class_maps: Path
    slide_truth: Path
    description: Path


@dataclass(frozen=True)
class _SlideJob:
    slide_id: str
    subtype: int
    necrosis_target: float
    entropy: tuple[int, ...]
    slide_px: int
    mpp: float
    slide_path: Path
    class_map_path: Path


def _run_slide_job(job: _SlideJob) -> tuple[np.ndarray, list[tuple[str, int, int, int, str, str]]]:
    """Lay out, paint and write one slide and its class map; return class pixel counts and captions.

    Its random streams depend only on the job (seed, slide index), so the result is the same whichever
    worker runs it, and in whatever order.
    """
    layout_rng, render_rng, stain_rng, caption_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(job.entropy).spawn(4)
    )
    label4 = _layout(layout_rng, job.slide_px, job.mpp, job.necrosis_target, job.subtype)
    rgb = _render_slide(render_rng, label4, job.mpp, _Stain.random(stain_rng))
    write_pyramid_tiff(job.slide_path, rgb, mpp=job.mpp, downsamples=(1, 4, 16))
    _write_class_map(job.class_map_path, label4)
    counts = np.bincount(label4.ravel(), minlength=len(TISSUE_CLASSES)) * CLASS_MAP_DOWNSAMPLE**2
    return counts, _caption_rows(caption_rng, job.slide_id, label4, job.mpp)


def _default_workers(n_jobs: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, n_jobs))


def _run_jobs(jobs: list[_SlideJob], workers: int) -> list[Any]:
    if workers <= 1 or len(jobs) <= 1:
        return [_run_slide_job(job) for job in jobs]
    # fork, not spawn/forkserver: those re-import ``__main__``, which breaks callers without a main
    # guard (a Snakemake ``script:`` is one). Workers touch only numpy/PIL/tifffile, no parent threads.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        return list(pool.map(_run_slide_job, jobs, chunksize=1))


def _split_patients(rng: np.random.Generator, subtype: np.ndarray, train_fraction: float) -> np.ndarray:
    """``train``/``test`` per patient, stratified by subtype, each subtype in both splits if it can be."""
    split = np.full(subtype.size, "test", dtype=object)
    for s in np.unique(subtype):
        members = rng.permutation(np.flatnonzero(subtype == s))
        n_train = int(round(train_fraction * members.size))
        if members.size >= 2:
            n_train = min(max(n_train, 1), members.size - 1)
        split[members[:n_train]] = "train"
    return split


def _simulate_survival(rng: np.random.Generator, linear_predictor: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Weibull proportional-hazards event times with independent exponential censoring.

    Censoring times are ``C_i = E_i / rate`` with ``E_i ~ Exp(1)`` i.i.d. and independent of
    everything else; the one scalar ``rate`` is then set so that ``round(CENSORED_FRACTION * n)``
    patients are censored, because with ~30 patients a purely random censored fraction would range
    from 10 % to 55 % between seeds.
    """
    n = linear_predictor.size
    lam = math.log(2) / BASELINE_MEDIAN_MONTHS**WEIBULL_SHAPE
    event_time = (-np.log(rng.random(n)) / (lam * np.exp(linear_predictor))) ** (1 / WEIBULL_SHAPE)
    unit_censor = rng.exponential(1.0, n)
    # Patient i is censored iff rate > unit_censor_i / event_time_i; censor the k smallest ratios.
    ratios = np.sort(unit_censor / event_time)
    k = int(round(CENSORED_FRACTION * n))
    if k <= 0:
        rate = ratios[0] / 2
    elif k >= n:
        rate = ratios[-1] * 2
    else:
        rate = math.sqrt(ratios[k - 1] * ratios[k])
    censor_time = unit_censor / rate
    event = (event_time <= censor_time).astype(np.int64)
    time = np.maximum(np.round(np.minimum(event_time, censor_time), 2), 0.01)
    return time, event, float(rate)


def make_demo_cohort(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_patients: int = 32,
    extra_slides: int = 4,
    slide_px: int = 3072,
    mpp: float = 0.5,
    train_fraction: float = 0.375,
    workers: int | None = None,
) -> DemoCohort:
    """Write a synthetic cohort (slides, sheet, clinical table, truth) into ``out_dir``.

    Files: ``slides/{slide_id}.tiff``, ``slides.tsv`` (sheet: slide_id, patient_id, path, label,
    split), ``clinical.tsv`` (patient_id, time, event, age, sex, subtype, subtype_squamous,
    necrosis_fraction), ``true_coefficients.tsv``, ``captions.tsv`` (tile-caption pairs),
    ``class_maps/{slide_id}.png``, ``slide_truth.tsv`` (per-slide class fractions) and ``cohort.json``
    (the generator's parameters). Output is byte-identical for the same arguments, whatever
    ``workers`` (processes; default: one per available core).
    """
    if slide_px < 256 or slide_px % 64:
        raise ValueError(f"slide_px must be a multiple of 64 and at least 256, got {slide_px}")
    if not (0.05 <= mpp <= 5):
        raise ValueError(f"mpp must be a plausible µm per pixel (0.05-5), got {mpp}")
    if n_patients < 2:
        raise ValueError(f"n_patients must be at least 2 (one per subtype), got {n_patients}")
    if not (0 <= train_fraction <= 1):
        raise ValueError(f"train_fraction must be in [0, 1], got {train_fraction}")
    if extra_slides < 0:
        raise ValueError(f"extra_slides must be >= 0, got {extra_slides}")

    root = Path(out_dir)
    slides_dir, maps_dir = root / "slides", root / "class_maps"
    slides_dir.mkdir(parents=True, exist_ok=True)
    maps_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))

    # Patients: subtype, necrosis tendency, age, sex, split.
    subtype = rng.permutation(np.arange(n_patients) % len(SUBTYPES))
    patient_ids = [f"demo-p{i + 1:03d}" for i in range(n_patients)]
    necrosis_patient = rng.uniform(0.0, 0.34, n_patients)
    age = np.clip(np.rint(rng.normal(64, 9, n_patients)), 38, 88).astype(np.int64)
    sex = rng.choice(np.array(["F", "M"]), n_patients)
    split = _split_patients(rng, subtype, train_fraction)
    second = np.zeros(n_patients, bool)
    second[rng.choice(n_patients, min(extra_slides, n_patients), replace=False)] = True

    jobs: list[_SlideJob] = []
    owners: list[int] = []
    for p, pid in enumerate(patient_ids):
        for s in range(2 if second[p] else 1):
            slide_id = f"{pid}-s{s + 1}"
            target = float(np.clip(necrosis_patient[p] + rng.normal(0, 0.02), 0, 0.35))
            jobs.append(
                _SlideJob(
                    slide_id=slide_id,
                    subtype=TISSUE_CLASSES.index(SUBTYPES[subtype[p]]),
                    necrosis_target=target,
                    entropy=(seed, 1, len(jobs)),
                    slide_px=slide_px,
                    mpp=float(mpp),
                    slide_path=slides_dir / f"{slide_id}.tiff",
                    class_map_path=maps_dir / f"{slide_id}.png",
                )
            )
            owners.append(p)
    results = _run_jobs(jobs, workers if workers is not None else _default_workers(len(jobs)))

    # Per-slide truth, as realised on the class maps.
    counts = np.array([r[0] for r in results], dtype=np.float64)
    tissue_px = counts[:, 1:].sum(axis=1)
    truth = pd.DataFrame(
        {
            "slide_id": [j.slide_id for j in jobs],
            "patient_id": [patient_ids[p] for p in owners],
            "label": [SUBTYPES[subtype[p]] for p in owners],
            "tissue_fraction": tissue_px / slide_px**2,
            "necrosis_fraction": counts[:, NECROSIS] / tissue_px,
        }
    )
    for cls in range(1, len(TISSUE_CLASSES)):
        truth[f"{TISSUE_CLASSES[cls]}_fraction_of_tissue"] = counts[:, cls] / tissue_px

    sheet = pd.DataFrame(
        {
            "slide_id": truth["slide_id"],
            "patient_id": truth["patient_id"],
            "path": [f"slides/{j.slide_id}.tiff" for j in jobs],
            "label": truth["label"],
            "split": [split[p] for p in owners],
        }
    )

    # Survival from the known Cox model, on the necrosis actually painted.
    owners_arr = np.asarray(owners)
    necrosis = np.bincount(owners_arr, counts[:, NECROSIS], n_patients) / np.bincount(owners_arr, tissue_px, n_patients)
    squamous = (subtype == SUBTYPES.index("squamous")).astype(np.int64)
    covariates = {"subtype_squamous": squamous, "necrosis_fraction": necrosis, "age": age}
    linear_predictor = sum(TRUE_COEFFICIENTS[k] * np.asarray(v, np.float64) for k, v in covariates.items())
    linear_predictor = linear_predictor - TRUE_COEFFICIENTS["age"] * 60  # baseline: age 60
    time, event, censor_rate = _simulate_survival(rng, np.asarray(linear_predictor))
    clinical = pd.DataFrame(
        {
            "patient_id": patient_ids,
            "time": time,
            "event": event,
            "age": age,
            "sex": sex,
            "subtype": [SUBTYPES[s] for s in subtype],
            "subtype_squamous": squamous,
            "necrosis_fraction": np.round(necrosis, 6),
        }
    )
    coefficients = pd.DataFrame(
        {
            "covariate": list(TRUE_COEFFICIENTS),
            "coefficient": list(TRUE_COEFFICIENTS.values()),
            "description": [_COEFFICIENT_DESCRIPTIONS[k] for k in TRUE_COEFFICIENTS],
        }
    )
    captions = pd.DataFrame(
        [row for r in results for row in r[1]],
        columns=["slide_id", "x", "y", "tile_level0_px", "tissue_class", "caption"],
    )
    description = {
        "generator": "histoclip.synth.make_demo_cohort",
        "seed": seed,
        "n_patients": n_patients,
        "n_slides": len(jobs),
        "slide_px": slide_px,
        "mpp": mpp,
        "pyramid_downsamples": [1, 4, 16],
        "train_fraction": train_fraction,
        "tissue_classes": list(TISSUE_CLASSES),
        "subtypes": list(SUBTYPES),
        "class_map_downsample": CLASS_MAP_DOWNSAMPLE,
        "caption_tile_um": CAPTION_TILE_UM,
        "caption_min_purity": CAPTION_MIN_PURITY,
        "survival": {
            "model": "h(t) = lambda * k * t^(k-1) * exp(sum(coefficient * covariate) - 0.04 * 60)",
            "weibull_shape": WEIBULL_SHAPE,
            "baseline_median_months": BASELINE_MEDIAN_MONTHS,
            "censoring": "independent exponential drop-out, C = Exp(1) / rate, one rate chosen so that "
            "round(censored_fraction * n_patients) patients are censored",
            "censoring_rate_per_month": round(censor_rate, 8),
            "censored_fraction": CENSORED_FRACTION,
            "coefficients": TRUE_COEFFICIENTS,
        },
    }

    paths = DemoCohort(
        root=root,
        sheet=root / "slides.tsv",
        clinical=root / "clinical.tsv",
        coefficients=root / "true_coefficients.tsv",
        captions=root / "captions.tsv",
        class_maps=maps_dir,
        slide_truth=root / "slide_truth.tsv",
        description=root / "cohort.json",
    )
    _write_tsv(paths.slide_truth, truth)
    _write_tsv(paths.clinical, clinical)
    _write_tsv(paths.coefficients, coefficients)
    _write_tsv(paths.captions, captions)
    with atomic_path(paths.description) as tmp:
        tmp.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _write_tsv(paths.sheet, sheet)  # last: a sheet on disk means the cohort is complete
    return paths


# --------------------------------------------------------------------------------------------------
# A large slide for benchmarks


_LARGE_TEXTURE_CLASSES = (ADENOCARCINOMA, SQUAMOUS, STROMA, LYMPHOCYTES, NECROSIS, FAT, ADENOCARCINOMA, STROMA)


class _TileSource:
    """Tiles of a pyramid whose level 0 is a mosaic of a few pre-encoded texture tiles.

    A level-L tile is identified by a key: ``"w"`` (white) or the tuple of its 16 level-(L-1) child
    keys; a level-0 tissue tile is ``(variant, row, col)`` inside a 4×4-tile texture block. Tiles are
    composed from their children's 64×64 reductions and encoded once per distinct key, so repeated
    content (white, whole texture blocks) costs nothing and level 0 is never held in memory.
    """

    def __init__(self, textures: list[np.ndarray], tile: int, quality: int) -> None:
        self.tile, self.quality = tile, quality
        self.textures = textures
        self._bytes: dict[Any, bytes] = {}
        self._small: dict[Any, np.ndarray] = {}
        white = np.full((tile, tile, 3), 255, np.uint8)
        self._bytes["w"] = _encode_jpeg_tile(white, quality)
        self._small["w"] = white[: tile // 4, : tile // 4]

    def pixels(self, key: Any) -> np.ndarray:
        t = self.tile
        if key == "w":
            return np.full((t, t, 3), 255, np.uint8)
        if isinstance(key[0], int):  # level 0: (variant, row, col)
            v, r, c = key
            return self.textures[v][r * t : (r + 1) * t, c * t : (c + 1) * t]
        q = t // 4
        out = np.empty((t, t, 3), np.uint8)
        for i, child in enumerate(key):
            out[(i // 4) * q : (i // 4 + 1) * q, (i % 4) * q : (i % 4 + 1) * q] = self.small(child)
        return out

    def small(self, key: Any) -> np.ndarray:
        """The tile reduced 4× by area averaging (its footprint in the next level)."""
        if key not in self._small:
            self._small[key] = np.asarray(_reduce(Image.fromarray(self.pixels(key)), 4))
        return self._small[key]

    def encoded(self, key: Any) -> bytes:
        if key not in self._bytes:
            self._bytes[key] = _encode_jpeg_tile(np.ascontiguousarray(self.pixels(key)), self.quality)
        return self._bytes[key]


def write_large_slide(
    path: str | os.PathLike[str],
    *,
    level0_px: int = 100_000,
    mpp: float = 0.25,
    tissue_fraction: float = 0.5,
    seed: int = 0,
) -> None:
    """Write a ``level0_px``² pyramidal JPEG-tiled BigTIFF (downsamples 1, 4, 16, 64) for benchmarks.

    A realistic size for tiling/embedding benchmarks (100k² ≈ a 40× resection) without holding level 0
    (30 GB at 100k²) in memory: level 0 is a mosaic of eight 1024² painted textures placed on a
    tile-resolution tissue mask (about ``tissue_fraction`` of the area, on white), fed to tifffile as
    pre-encoded JPEG tiles; reduced levels are composed from the same tiles. Tissue edges are
    therefore 256-px steps at level 0. Deterministic for a seed; written atomically.
    """
    if level0_px < 1024:
        raise ValueError(f"level0_px must be at least 1024, got {level0_px}")
    if not (0 < tissue_fraction < 1):
        raise ValueError(f"tissue_fraction must be in (0, 1), got {tissue_fraction}")
    tile, quality, block = 256, 90, 4
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    texture_px = tile * block
    textures = []
    for cls in _LARGE_TEXTURE_CLASSES:
        label4 = np.full((texture_px // CLASS_MAP_DOWNSAMPLE,) * 2, cls, np.uint8)
        textures.append(_render_slide(rng, label4, mpp, _Stain.random(rng)))
    source = _TileSource(textures, tile, quality)

    # Tissue mask on the level-0 tile grid: one or two smooth blobs, thresholded to the target area.
    n0 = -(-level0_px // tile)
    g = 96
    yy, xx = np.mgrid[0:g, 0:g].astype(np.float32) / g
    field = np.exp(-(((yy - 0.48) / 0.3) ** 2 + ((xx - 0.45) / 0.34) ** 2))
    field += 0.6 * np.exp(-(((yy - 0.7) / 0.18) ** 2 + ((xx - 0.75) / 0.16) ** 2))
    field += 0.25 * _smooth_noise(rng, (g, g), 6)
    field *= np.clip(np.minimum(np.minimum(yy, 1 - yy), np.minimum(xx, 1 - xx)) / 0.06, 0, 1)
    mask_field = _upsample(field, (n0, n0))
    tissue = mask_field > np.quantile(mask_field, 1 - tissue_fraction)
    variants = rng.integers(0, len(textures), (-(-n0 // block), -(-n0 // block)))

    keys = np.empty((n0, n0), dtype=object)
    keys[:] = "w"
    for r, c in zip(*np.nonzero(tissue), strict=True):
        keys[r, c] = (int(variants[r // block, c // block]), int(r % block), int(c % block))

    levels = [keys]
    for _ in range(3):
        prev = levels[-1]
        n = -(-prev.shape[0] // 4)
        nxt = np.empty((n, n), dtype=object)
        for r in range(n):
            for c in range(n):
                children = tuple(
                    prev[4 * r + i, 4 * c + j] if 4 * r + i < prev.shape[0] and 4 * c + j < prev.shape[1] else "w"
                    for i in range(4)
                    for j in range(4)
                )
                nxt[r, c] = "w" if all(k == "w" for k in children) else children
        levels.append(nxt)

    options = {**_jpeg_options(quality), **_tiff_resolution(mpp)}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, level_keys in enumerate(levels):
            size = -(-level0_px // 4**i)
            tw.write(
                (source.encoded(k) for k in level_keys.ravel()),
                shape=(size, size, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                subfiletype=1 if i else 0,
                metadata=None,
                software="histoclip.synth",
                **options,
            )
