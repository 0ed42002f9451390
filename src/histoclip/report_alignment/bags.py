"""Bags of tile embeddings, streamed from the embedding files one slide at a time.

Why streamed: a cohort's tile embeddings do not fit in memory (2,000 slides × 5,000 tiles × 512 float32 is
20 GB), so each training step reads the slides of its batch. Bags are kept in memory only up to
``cache_mb`` (small cohorts such as the demo then read each file once).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from histoclip import formats
from histoclip.errors import InputError

__all__ = ["BagReader", "sample_tiles"]


class BagReader:
    """Tile embeddings (x, y, [N, D] float32) of each slide, read from its embedding file on demand."""

    def __init__(self, files: Mapping[str, str | Path], cache_mb: float = 1024.0) -> None:
        self.files = dict(files)
        self.cache_bytes = cache_mb * 2**20
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._cached_bytes = 0
        self.weights_sha256: str | None = None

    def __call__(self, slide_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if slide_id in self._cache:
            return self._cache[slide_id]
        path = self.files[slide_id]
        x, y, embeddings, meta = formats.read_tile_embeddings(path)
        sha = meta.get("weights_sha256")
        if self.weights_sha256 is None:
            self.weights_sha256 = sha
        elif sha != self.weights_sha256:
            raise InputError(
                f"made with weights {str(sha)[:12]}…, other slides with {self.weights_sha256[:12]}…",
                where=f"slide {slide_id!r} ({path})",
                fix="re-run the embedding step so that every slide is embedded by the same model",
            )
        if len(x) == 0:
            raise InputError(
                "has no tiles to pool", where=f"slide {slide_id!r} ({path})", fix="check its tiling/QC output"
            )
        bag = (x, y, embeddings)
        if self._cached_bytes + embeddings.nbytes <= self.cache_bytes:
            self._cache[slide_id] = bag
            self._cached_bytes += embeddings.nbytes
        return bag


def sample_tiles(n_tiles: int, max_tiles: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``max_tiles`` tiles, drawn without replacement and kept in file order (training draws
    a fresh sample per epoch: bounded memory and time per step, and an augmentation)."""
    if n_tiles <= max_tiles:
        return np.arange(n_tiles)
    return np.sort(rng.choice(n_tiles, size=max_tiles, replace=False))
