"""Feeding the training loop: seeded batches of pair keys, and where their pixels come from (workers or memory).

Batches are a seeded permutation per epoch, so a run sees the same batches whatever the number of workers.
When the decoded pairs fit in ``cache_mb`` they are read once, by all cores, and the steps run from memory
(measured on 2 cores: decoding and resizing a 224-px tile costs about a quarter of the demo model's training
step on it at 112 px, and a run sees each tile ~10 times).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd
import torch

from histoclip.training.dataset import PairImages, TileSet, read_tile_set, worker_init
from histoclip.training.pairs import pair_kind, slide_pairs_with_tiles
from histoclip.training.settings import TrainSettings


class EpochBatches:
    """Endless batches of dataset keys: a seeded permutation per epoch, the incomplete last batch dropped.

    Keys are pair indices, or ``(index, epoch)`` for slide-level pairs (a fresh bag each epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, bags: bool) -> None:
        self.n, self.batch_size, self.seed, self.bags = n, min(batch_size, n), seed, bags

    def __iter__(self) -> Iterator[list[Any]]:
        generator = torch.Generator().manual_seed(self.seed)
        epoch = 0
        while True:
            order = torch.randperm(self.n, generator=generator).tolist()
            for start in range(0, self.n - self.batch_size + 1, self.batch_size):
                chunk = order[start : start + self.batch_size]
                yield [(i, epoch) for i in chunk] if self.bags else chunk
            epoch += 1


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _loader(dataset: PairImages, workers: int, device: torch.device, **kwargs: Any) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=workers,
        worker_init_fn=worker_init if workers else None,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        **kwargs,
    )


def _preload(dataset: PairImages, rows: Sequence[int], workers: int, device: torch.device) -> torch.Tensor:
    """Decode the given pairs once (all workers) into one uint8 tensor [N, S, S, 3]."""
    out = torch.empty((len(rows), dataset.size, dataset.size, 3), dtype=torch.uint8)
    position = 0
    batch = 64
    sampler = [list(rows[i : i + batch]) for i in range(0, len(rows), batch)]
    for _, images in _loader(dataset, workers, device, batch_sampler=sampler):
        out[position : position + images.shape[0]] = images
        position += images.shape[0]
    return out


class TrainImages:
    """Where a run's pixels come from: :class:`PairImages` read by DataLoader workers, and decoded once into
    memory when the set fits in ``cache_mb`` (tile and image pairs)."""

    def __init__(
        self,
        pairs: pd.DataFrame,
        size: int,
        settings: TrainSettings,
        device: torch.device,
        tiles_dir: str | os.PathLike[str] | None,
        logger: logging.Logger,
    ) -> None:
        self.bag = pair_kind(pairs) == "slide"
        self.device = device
        tile_sets = None
        if self.bag:
            pairs = slide_pairs_with_tiles(pairs, tiles_dir)
            sets: dict[str, TileSet] = {}
            for slide_id, slide_path, tiles_path in pairs[["slide_id", "slide_path", "tiles_path"]].itertuples(
                index=False
            ):
                if slide_id not in sets:
                    sets[slide_id] = read_tile_set(slide_id, slide_path, tiles_path)
            tile_sets = [sets[s] for s in pairs["slide_id"]]
        self.dataset = PairImages(pairs, size, bag_size=settings.bag_size, seed=settings.seed, tile_sets=tile_sets)
        self.dataset.check_sources()
        self.n = len(pairs)
        self.cpus = _available_cpus()
        self.cached = not self.bag and self.n * size * size * 3 <= settings.cache_mb * 2**20
        if settings.num_workers != "auto":
            self.workers = int(settings.num_workers)
        elif self.cached:
            self.workers = min(16, self.cpus)  # the main process only waits while the cache fills
        else:
            self.workers = min(16, max(1, self.cpus - 1)) if device.type == "cuda" else max(1, self.cpus // 2)
        self.cache: torch.Tensor | None = None
        if self.cached:
            started = time.perf_counter()
            self.cache = _preload(self.dataset, range(self.n), self.workers, device)
            self.dataset.close()
            logger.info(
                "decoded %d images into memory (%.0f MB) in %.1f s with %d worker(s)",
                self.n,
                self.cache.numel() / 2**20,
                time.perf_counter() - started,
                self.workers,
            )

    @property
    def torch_threads(self) -> int:
        """CPU threads for the model: the cores the workers don't use while training."""
        return max(1, self.cpus - (0 if self.cached else self.workers))

    def batches(self, keys: EpochBatches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(pair indices, uint8 images) per batch of keys, in the order of ``keys``."""
        if self.cache is not None:
            for batch in keys:
                index = torch.tensor(batch)
                yield index, self.cache.index_select(0, index)
        else:
            yield from _loader(self.dataset, self.workers, self.device, batch_sampler=keys)

    def pixels(self, rows: Sequence[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The given pairs' images in chunks, without augmentation (bags: the first draw)."""
        if self.cache is not None:
            for start in range(0, len(rows), 256):
                index = torch.tensor(list(rows[start : start + 256]))
                yield index, self.cache.index_select(0, index)
        else:
            chunk = 16 if self.bag else 128
            sampler = [[(k, 0) if self.bag else k for k in rows[i : i + chunk]] for i in range(0, len(rows), chunk)]
            yield from _loader(self.dataset, self.workers, self.device, batch_sampler=sampler)
