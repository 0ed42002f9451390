"""Nuclei of the demo's tissue classes: sprites stamped at full resolution, and where each class puts them.

Sprites are precomputed per slide and stamped many times (max-compositing into the haematoxylin layer),
which is what makes drawing ~10^4 nuclei per slide cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from histoclip.demo.classes import ADENOCARCINOMA, CLASS_MAP_DOWNSAMPLE, SQUAMOUS
from histoclip.demo.stain import OD_SCALE


@dataclass
class Nuclei:
    """Nuclei to stamp at full resolution: centres (level-0 px) and sprite indices into a bank."""

    ys: np.ndarray
    xs: np.ndarray
    which: np.ndarray
    bank: list[np.ndarray]


def ellipse_sprite(
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
    return np.clip(level * alpha * OD_SCALE, 0, 255).astype(np.uint8)


def stamp(
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


def sample_positions(
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


def on_class(label4: np.ndarray, ys: np.ndarray, xs: np.ndarray, cls: int) -> np.ndarray:
    """Which level-0 positions lie on the slide and on class ``cls`` of the class map."""
    size = label4.shape[0] * CLASS_MAP_DOWNSAMPLE
    inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    ok = np.zeros(ys.shape, bool)
    ok[inside] = label4[ys[inside] // CLASS_MAP_DOWNSAMPLE, xs[inside] // CLASS_MAP_DOWNSAMPLE] == cls
    return ok


def oriented_bank(
    rng: np.random.Generator, semi_long: float, semi_short: float, od: float, n_angles: int = 16, **kw: Any
) -> list[np.ndarray]:
    """Sprites at ``n_angles`` orientations over [0, pi), two shape variants each (index = 2*bin+v)."""
    bank = []
    for i in range(n_angles):
        for _ in range(2):
            jitter = rng.uniform(0.85, 1.15)
            bank.append(ellipse_sprite(rng, semi_long * jitter, semi_short * jitter, i * np.pi / n_angles, od, **kw))
    return bank


def angle_index(rng: np.random.Generator, angles: np.ndarray, n_angles: int = 16) -> np.ndarray:
    """Indices into an :func:`oriented_bank`: the nearest orientation bin, and one of its two variants."""
    bins = np.rint(np.mod(angles, np.pi) / (np.pi / n_angles)).astype(np.int64) % n_angles
    return 2 * bins + rng.integers(0, 2, bins.size)


def gland_nuclei(
    rng: np.random.Generator, glands: dict[str, np.ndarray], label4: np.ndarray, mpp: float, scale: float
) -> Nuclei:
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
    ok = on_class(label4, ys, xs, ADENOCARCINOMA)
    bank = oriented_bank(rng, 4.6 * scale * px, 2.4 * scale * px, 1.2)
    return Nuclei(ys[ok], xs[ok], angle_index(rng, orientation[ok]), bank)


def squamous_nuclei(
    rng: np.random.Generator,
    seed_y: np.ndarray,
    seed_x: np.ndarray,
    pearls: np.ndarray,
    label4: np.ndarray,
    mpp: float,
    scale: float,
) -> Nuclei:
    """One large vesicular nucleus near the centre of each polygonal cell, none inside keratin pearls."""
    px = 1.0 / mpp
    sy = seed_y.ravel() + rng.normal(0, 0.8, seed_y.size)
    sx = seed_x.ravel() + rng.normal(0, 0.8, seed_x.size)
    ok = rng.random(sy.size) < 0.92
    for cy, cx, radius in pearls:
        ok &= (sy - cy) ** 2 + (sx - cx) ** 2 > (radius * 1.2 + 2.5) ** 2
    ys = np.rint(sy * px).astype(np.int64)
    xs = np.rint(sx * px).astype(np.int64)
    ok &= on_class(label4, ys, xs, SQUAMOUS)
    bank = [
        ellipse_sprite(
            rng, r * px, r * rng.uniform(0.72, 0.95) * px, rng.uniform(0, np.pi), od, vesicular=0.5, wobble=0.1
        )
        for r, od in zip(rng.uniform(4.0, 5.4, 24) * scale, rng.uniform(0.95, 1.25, 24), strict=True)
    ]
    return Nuclei(ys[ok], xs[ok], rng.integers(0, len(bank), int(ok.sum())), bank)
