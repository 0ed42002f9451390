"""The per-slide stain: haematoxylin and eosin optical densities turned into RGB by Beer-Lambert.

Stain layers are painted as optical density (OD) and quantised to uint8 in steps of 1/:data:`OD_SCALE`; the
per-slide lookup table from the two quantised layers to RGB is also where the stain colour jitter lives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OD_SCALE = 100.0  # stain layers are stored as uint8 optical density × 100 (0.01 OD per step)


@dataclass(frozen=True)
class Stain:
    """Per-slide stain: OD per unit of haematoxylin and eosin in R, G, B, plus glass OD."""

    h: np.ndarray
    e: np.ndarray
    glass: np.ndarray

    @staticmethod
    def random(rng: np.random.Generator) -> Stain:
        h = np.array([0.80, 0.95, 0.36]) * (1 + rng.normal(0, 0.05, 3)) * rng.uniform(0.88, 1.12)
        e = np.array([0.14, 1.00, 0.42]) * (1 + rng.normal(0, 0.06, 3)) * rng.uniform(0.85, 1.15)
        glass = np.full(3, rng.uniform(0.012, 0.03)) + rng.normal(0, 0.004, 3)
        return Stain(h=h, e=e, glass=np.clip(glass, 0, None))

    def shifted(self, site_effect: float) -> Stain:
        """The same stain as another hospital's lab would give it: both stains ``1 + site_effect`` times as dense,
        haematoxylin bluer. The demo's site audit has to find this (``demo.site_effect``); 0 = unchanged."""
        if site_effect == 0:
            return self
        tilt = np.array([1.0, 0.6, -0.2])  # more OD in red and green: a bluer, darker haematoxylin
        return Stain(h=self.h * (1 + site_effect * tilt), e=self.e * (1 + site_effect), glass=self.glass)

    def lut(self) -> np.ndarray:
        """(65536, 3) uint8 Beer-Lambert table indexed by ``(H_od8 << 8) | E_od8``."""
        levels = np.arange(256, dtype=np.float64) / OD_SCALE
        od = levels[:, None, None] * self.h + levels[None, :, None] * self.e + self.glass
        return np.clip(255 * np.exp(-od) + 0.5, 0, 255).astype(np.uint8).reshape(65536, 3)
