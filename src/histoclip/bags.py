"""Bags: one slide's tile embeddings, read from its embedding file when a slide-level model (MIL, the slide–report
aligner) needs it.

Why streamed: a cohort of 2,000 slides × 5,000 tiles × 512 dimensions is ~10 GB in float16, more than a node
should hold to train a small model. The cross-validation keeps only slide ids; a bag is read from its Parquet
file (:func:`histoclip.formats.read_tile_embeddings`) when it is its turn, and the next bag is read in a
background thread while the model works on this one (pyarrow decodes without the GIL), so at most two bags are
in memory whatever the cohort's size, plus a bounded cache (``mil.bag_cache_mb``).

Why a cache that only fills: training reads every training bag once per epoch, in a new random order each time.
Reading and decoding a Parquet file costs about a millisecond even for a small bag, which made the 200-patient
demo's cross-validation spend most of its time in pyarrow. Bags are kept as they are first read until the cache
is full and never evicted: under a shuffled order any eviction rule would drop bags that are as likely to come
next as the ones it keeps, so a fill-once cache already gets the best hit rate a cache of that size can
(the cached share of the cohort), with no bookkeeping. A cohort that fits is read once per job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from histoclip import formats
from histoclip.errors import InputError

__all__ = ["Bag", "BagReader"]


@dataclass(frozen=True)
class Bag:
    """One slide's tiles: level-0 corners and embeddings ``[N, D]`` (float32)."""

    slide_id: str
    x: np.ndarray
    y: np.ndarray
    features: np.ndarray

    @property
    def n_tiles(self) -> int:
        return len(self.features)


class BagReader:
    """Reads bags by slide id from ``paths`` (slide id → embedding file)."""

    def __init__(self, paths: Mapping[str, str | os.PathLike[str]], cache_bytes: int = 0) -> None:
        self.paths = dict(paths)
        self.cache_bytes = cache_bytes
        self._cache: dict[str, Bag] = {}
        self._cached_bytes = 0
        #: The embedding weights of the bags read so far: every bag of one reader must come from the same weights.
        self.weights_sha256: str | None = None

    def dim(self, slide_ids: Sequence[str]) -> int:
        """The embedding dimension (from the footers only), checked to agree over ``slide_ids``."""
        dims = {formats.read_embedding_footer(self.paths[s]).dim for s in slide_ids}
        if len(dims) != 1:
            raise InputError(
                f"embedding files of different dimensions {sorted(dims)}",
                where="the embedding manifest",
                fix="re-embed every slide with one model",
            )
        return dims.pop()

    def read(self, slide_id: str) -> Bag:
        if slide_id in self._cache:
            return self._cache[slide_id]
        if slide_id not in self.paths:
            raise InputError(f"no embedding file for slide {slide_id!r}", where="the embedding manifest")
        path = self.paths[slide_id]
        x, y, features, meta = formats.read_tile_embeddings(path)
        sha = meta.get("weights_sha256")
        if self.weights_sha256 is None:
            self.weights_sha256 = sha
        elif sha != self.weights_sha256:
            raise InputError(
                f"made with weights {str(sha)[:12]}…, other slides with {self.weights_sha256[:12]}…",
                where=f"slide {slide_id!r} ({path})",
                fix="re-run the embedding step so that every slide is embedded by the same model",
            )
        bag = Bag(slide_id, x, y, features)
        size = x.nbytes + y.nbytes + features.nbytes
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[slide_id] = bag
            self._cached_bytes += size
        return bag

    def __call__(self, slide_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, embeddings) of one slide: the reader as the slide–report aligner's bag function."""
        bag = self.read(slide_id)
        return bag.x, bag.y, bag.features

    def iterate(self, slide_ids: Sequence[str]) -> Iterator[Bag]:
        """The bags of ``slide_ids`` in that order, each next one read while the caller works on the current."""
        if not slide_ids:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="bag-reader") as pool:
            pending: Future[Bag] = pool.submit(self.read, slide_ids[0])
            for following in [*slide_ids[1:], None]:
                bag = pending.result()
                if following is not None:
                    pending = pool.submit(self.read, following)
                yield bag
