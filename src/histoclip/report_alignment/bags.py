"""Tiles drawn from a bag for a training step (the bags themselves: :class:`histoclip.bags.BagReader`, shared with
MIL: streamed from the embedding files, kept in memory up to a bound)."""

from __future__ import annotations

import numpy as np

__all__ = ["sample_tiles"]


def sample_tiles(n_tiles: int, max_tiles: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``max_tiles`` tiles, drawn without replacement and kept in file order (training draws
    a fresh sample per epoch: bounded memory and time per step, and an augmentation)."""
    if n_tiles <= max_tiles:
        return np.arange(n_tiles)
    return np.sort(rng.choice(n_tiles, size=max_tiles, replace=False))
