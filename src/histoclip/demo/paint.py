"""Painting a demo slide: per-class H&E textures in optical density, nuclei stamped, Beer-Lambert to RGB.

Structures larger than a few µm are computed at half resolution; nuclei are stamped at full resolution
from small precomputed sprites (:mod:`histoclip.demo.nuclei`); the two stain layers become RGB through the
slide's lookup table (:class:`~histoclip.demo.stain.Stain`). All sizes are in µm and converted with the
slide's mpp, so a slide written at another resolution shows the same tissue at another pixel scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from histoclip.demo.classes import (
    ADENOCARCINOMA,
    CLASS_MAP_DOWNSAMPLE,
    LYMPHOCYTES,
    NECROSIS,
    SQUAMOUS,
    STROMA,
    TISSUE_CLASSES,
)
from histoclip.demo.noise import smooth_noise, upsample, upsample_u8, worley
from histoclip.demo.nuclei import (
    Nuclei,
    angle_index,
    ellipse_sprite,
    gland_nuclei,
    oriented_bank,
    sample_positions,
    squamous_nuclei,
    stamp,
)
from histoclip.demo.stain import OD_SCALE, Stain


@dataclass
class _Fields:
    """Per-pixel inputs of the class painters for one class's pixels (positions in µm)."""

    y: np.ndarray
    x: np.ndarray
    grain: np.ndarray  # white noise, ~1 µm
    mid: np.ndarray  # ~5 µm blotches
    low: np.ndarray  # ~100 µm drift


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
    border_dist, seed_y, seed_x = worley(f.y, f.x, cell, rng)
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
    border_dist, _, _ = worley(f.y, f.x, cell, rng)
    membrane = np.exp(-((border_dist / 1.1) ** 2))
    e = 0.42 * membrane + 0.004 * f.grain
    h = 0.05 * membrane
    return h, e


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


def _paint_class(
    rng: np.random.Generator, cls: int, f: _Fields, label4: np.ndarray, mpp: float, scale: float, theta: float
) -> tuple[np.ndarray, np.ndarray, list[Nuclei]]:
    """The H and E optical densities of one class's pixels, and the nuclei to stamp on them."""
    size = label4.shape[0] * CLASS_MAP_DOWNSAMPLE
    um_half = 2 * mpp  # µm per half-resolution pixel
    px = 1.0 / mpp  # level-0 px per µm
    nuclei: list[Nuclei] = []
    if cls == STROMA:
        h, e = _paint_stroma(f, theta, rng)
        ys, xs = sample_positions(rng, label4, STROMA, 26 * scale * px, 0.45, 0.55)
        bank = oriented_bank(rng, 6.0 * scale * px, 1.3 * scale * px, 1.05)
        angles = np.full(ys.size, theta) + rng.normal(0, 0.15, ys.size)
        nuclei.append(Nuclei(ys, xs, angle_index(rng, angles), bank))
    elif cls == ADENOCARCINOMA:
        cell = 52.0 * scale
        glands = _gland_grid(rng, size * mpp, cell)
        h, e = _paint_adenocarcinoma(f, glands, cell)
        nuclei.append(gland_nuclei(rng, glands, label4, mpp, scale))
    elif cls == SQUAMOUS:
        cell = 15.0 * scale
        h, e, (seed_y, seed_x) = _paint_squamous(f, rng, cell)
        h, e, pearls = _keratin_pearls(rng, f, h, e, scale, um_half)
        nuclei.append(squamous_nuclei(rng, seed_y, seed_x, pearls, label4, mpp, scale))
    elif cls == NECROSIS:
        h, e = _paint_necrosis(f)
        ys, xs = sample_positions(rng, label4, NECROSIS, 6.5 * scale * px, 0.5, 0.6)
        bank = [
            ellipse_sprite(rng, r * px, r * rng.uniform(0.5, 1) * px, rng.uniform(0, np.pi), od, wobble=0.3)
            for r, od in zip(rng.uniform(0.5, 1.6, 24), rng.uniform(0.9, 1.5, 24), strict=True)
        ]
        ghosts = [
            ellipse_sprite(rng, 4.2 * scale * px, 3.6 * scale * px, rng.uniform(0, np.pi), 0.3, vesicular=0.6)
            for _ in range(4)
        ]
        gy, gx = sample_positions(rng, label4, NECROSIS, 24 * scale * px, 0.45, 0.5)
        nuclei.append(Nuclei(ys, xs, rng.integers(0, len(bank), ys.size), bank))
        nuclei.append(Nuclei(gy, gx, rng.integers(0, len(ghosts), gy.size), ghosts))
    elif cls == LYMPHOCYTES:
        h, e = _paint_lymphocytes(f)
        ys, xs = sample_positions(rng, label4, LYMPHOCYTES, 7.6 * scale * px, 0.3, 0.9)
        bank = [
            ellipse_sprite(rng, r * px, r * rng.uniform(0.82, 1.0) * px, rng.uniform(0, np.pi), od, wobble=0.06)
            for r, od in zip(rng.uniform(2.6, 3.3, 16) * scale, rng.uniform(1.35, 1.7, 16), strict=True)
        ]
        nuclei.append(Nuclei(ys, xs, rng.integers(0, len(bank), ys.size), bank))
    else:  # FAT
        h, e = _paint_fat(f, rng, 48.0 * scale)
    return h, e, nuclei


def render_slide(rng: np.random.Generator, label4: np.ndarray, mpp: float, stain: Stain) -> np.ndarray:
    """Paint the level-0 RGB image (uint8, slide_px²) of a layout."""
    m = label4.shape[0]
    size = m * CLASS_MAP_DOWNSAMPLE
    half = size // 2
    um_half = 2 * mpp  # µm per half-resolution pixel
    scale = rng.uniform(0.9, 1.1)  # per-slide size jitter of every structure

    label2 = np.repeat(np.repeat(label4, 2, axis=0), 2, axis=1)
    grain = rng.standard_normal(half * half, dtype=np.float32)
    mid_shape = (max(half // 4, 8), max(half // 4, 8))
    mid = upsample(smooth_noise(rng, mid_shape, 1.4 * 0.5 / mpp), (half, half)).ravel()
    low_shape = (max(half // 32, 8), max(half // 32, 8))
    low = upsample(smooth_noise(rng, low_shape, 3.0 * 0.5 / mpp), (half, half)).ravel()

    h_half = np.zeros(half * half, np.float32)
    e_half = np.zeros(half * half, np.float32)
    flat_label = label2.ravel()
    present = np.bincount(flat_label, minlength=len(TISSUE_CLASSES)) > 0
    nuclei: list[Nuclei] = []
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
        h, e, class_nuclei = _paint_class(rng, cls, f, label4, mpp, scale, theta)
        nuclei.extend(class_nuclei)
        h_half[idx] = h
        e_half[idx] = e

    return _to_rgb(h_half, e_half, grain, nuclei, size, stain)


def _to_rgb(
    h_half: np.ndarray, e_half: np.ndarray, grain: np.ndarray, nuclei: list[Nuclei], size: int, stain: Stain
) -> np.ndarray:
    """Quantise the half-resolution layers to uint8 OD (0.01 steps) with a little dither, bring them to
    level 0, stamp the nuclei and look the pairs of layers up in the stain's RGB table."""
    half = size // 2
    dither = 0.5 + 0.35 * grain
    h8 = np.clip(h_half * OD_SCALE + dither, 0, 255).astype(np.uint8).reshape(half, half)
    e8 = np.clip(e_half * OD_SCALE + dither, 0, 255).astype(np.uint8).reshape(half, half)
    pad = max((max(s.shape) // 2 + 1 for n in nuclei for s in n.bank), default=1)
    h_full = np.zeros((size + 2 * pad, size + 2 * pad), np.uint8)
    h_full[pad:-pad, pad:-pad] = upsample_u8(h8, (size, size))
    for n in nuclei:
        stamp(h_full, pad, n.ys, n.xs, n.bank, n.which)
    e_full = upsample_u8(e8, (size, size))
    index = h_full[pad:-pad, pad:-pad].astype(np.uint16) << 8
    index |= e_full
    return np.take(stain.lut(), index, axis=0)
