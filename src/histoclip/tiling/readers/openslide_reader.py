"""OpenSlide, the first reader tried: Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura, Ventana, Zeiss (some),
DICOM with ImageType, and tiled pyramidal TIFFs. Its reads are unchanged from before readers existed (the same
``read_region`` call, the same compositing onto white), so what it reads stays byte-identical."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openslide

from histoclip.tiling.readers.base import ReadError


class OpenSlideReader:
    name = "openslide"
    mpp_source = "openslide-metadata"

    def __init__(self, path: str | Path) -> None:
        self._slide = openslide.OpenSlide(str(path))
        self.vendor = self._slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")

    @property
    def level_count(self) -> int:
        return self._slide.level_count

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._slide.dimensions

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._slide.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._slide.level_downsamples

    @property
    def properties(self) -> Mapping[str, str]:
        return self._slide.properties

    def metadata_mpp(self) -> tuple[float, float] | None:
        props = self._slide.properties
        try:
            return float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y])
        except (KeyError, ValueError):
            return None

    def objective_power(self) -> float | None:
        try:
            return float(self._slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER])
        except (KeyError, ValueError):
            return None

    def tile_size(self, level: int) -> tuple[int, int] | None:
        props = self._slide.properties
        try:
            return int(props[f"openslide.level[{level}].tile-width"]), int(
                props[f"openslide.level[{level}].tile-height"]
            )
        except (KeyError, ValueError):
            return None

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            region = self._slide.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            raise ReadError(str(exc)) from exc
        rgba = np.asarray(region)
        rgb = rgba[..., :3].copy()
        transparent = rgba[..., 3] == 0
        if transparent.any():
            rgb[transparent] = 255
        return rgb

    def read_level_rgb(self, level: int) -> np.ndarray:
        return self.read_rgb((0, 0), level, self._slide.level_dimensions[level])

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> OpenSlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
