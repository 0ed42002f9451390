"""The pixels of a pair table as a torch Dataset: tiles read from slides, image files, or bags of a slide's tiles.

Tiles are read with the tiling stage's reader (:func:`histoclip.tiling.slide.read_rgb`, its level choice
:func:`~histoclip.tiling.slide.read_level_for`) and resized to the training size with PIL in the worker
processes, so decoding runs on all cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from histoclip import formats
from histoclip.errors import InputError
from histoclip.tiling.slide import ReadError, open_wsi, read_level_for, read_rgb, undecodable_tile_error
from histoclip.training.pairs import pair_kind


@dataclass(frozen=True)
class TileSet:
    """The tiles of one slide (from its tile file), for slide-level pairs."""

    slide_id: str
    slide_path: str
    x: np.ndarray
    y: np.ndarray
    read_level: int
    read_tile_px: int
    tile_level0_px: int


def read_tile_set(slide_id: str, slide_path: str, tiles_path: str) -> TileSet:
    """A slide's tile positions and read geometry from its tile file (the tile rule's output)."""
    x, y, meta = formats.read_tile_file(tiles_path)
    if len(x) == 0:
        raise InputError(
            f"the tile file {tiles_path!r} of slide {slide_id!r} has no tiles ({meta.get('error') or 'no tissue'})",
            where=f"slide {slide_id!r}",
            fix="remove the slide from the pair table or fix its tiling",
        )
    return TileSet(
        slide_id=slide_id,
        slide_path=slide_path or str(meta.get("path", "")),
        x=x,
        y=y,
        read_level=int(meta.get("read_level", 0)),
        read_tile_px=int(meta.get("read_tile_px", meta.get("tile_level0_px", 224))),
        tile_level0_px=int(meta.get("tile_level0_px", 224)),
    )


def _resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``size``² (box average for integer factors, else bicubic)."""
    h, w = rgb.shape[:2]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        rgb = rgb[top : top + side, left : left + side]
    side = rgb.shape[0]
    if side == size:
        return np.array(rgb)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if side > size and side % size == 0:
        return np.array(image.reduce(side // size))  # np.array: a writable copy, as torch.from_numpy wants
    return np.array(image.resize((size, size), Image.Resampling.BICUBIC))


class PairImages(torch.utils.data.Dataset):
    """Pixels of the pairs, at the training size, as uint8 HWC tensors.

    Key ``i`` (tile and image pairs) → ``(i, [S, S, 3])``; key ``(i, draw)`` (slide-level pairs) →
    ``(i, [bag, S, S, 3])``, the bag drawn with a generator seeded by (seed, i, draw), so which tiles a step
    sees does not depend on which worker reads them. OpenSlide handles are opened lazily in each worker
    (a handle can't cross a fork) and kept; ``worker_init`` drops any inherited from the parent.
    Tiles without a read level are read at the coarsest pyramid level that still has ``image_size`` pixels
    across the tile.
    """

    def __init__(
        self,
        pairs: pd.DataFrame,
        image_size: int,
        *,
        bag_size: int = 16,
        seed: int = 0,
        tile_sets: Sequence[TileSet] | None = None,
    ) -> None:
        self.kind = pair_kind(pairs)
        self.size = int(image_size)
        self.bag_size = int(bag_size)
        self.seed = int(seed)
        self.n = len(pairs)
        if self.kind == "image":
            self.images = pairs["image"].tolist()
        elif self.kind == "tile":
            self.slide_ids = pairs["slide_id"].tolist()
            self.slide_paths = pairs["slide_path"].tolist()
            self.coords = pairs[["x", "y", "tile_level0_px", "read_level", "read_tile_px"]].to_numpy(np.int64)
        else:
            if tile_sets is None or len(tile_sets) != self.n:
                raise ValueError("slide-level pairs need one tile set per pair")
            self.tile_sets = list(tile_sets)
        self._handles: dict[str, Any] = {}
        self._levels: dict[tuple[str, int], tuple[int, int]] = {}

    def __len__(self) -> int:
        return self.n

    def reset_handles(self) -> None:
        """Forget handles inherited through a fork (the parent still owns and closes them)."""
        self._handles = {}

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def check_sources(self) -> None:
        """Open every slide (and find every image file) once, here, so that a bad source fails as an
        :class:`InputError` naming it rather than inside a worker process."""
        if self.kind == "image":
            missing = sorted({p for p in self.images if not Path(p).is_file()})
            if missing:
                raise InputError(
                    f"{len(missing)} image file(s) do not exist, e.g. {missing[0]!r}",
                    where="pairs",
                    fix="correct the image paths in the pair table",
                )
            return
        if self.kind == "tile":
            slides = dict(zip(self.slide_paths, self.slide_ids, strict=True))
        else:
            slides = {t.slide_path: t.slide_id for t in self.tile_sets}
        try:
            for path, slide_id in slides.items():
                self._slide(slide_id, path)
        finally:
            self.close()

    def _slide(self, slide_id: str, path: str) -> Any:
        if path not in self._handles:
            if len(self._handles) >= 16:
                self._handles.pop(next(iter(self._handles))).close()
            self._handles[path] = open_wsi(path, slide_id)
        return self._handles[path]

    def _auto_level(self, slide: Any, path: str, tile_level0_px: int) -> tuple[int, int]:
        """The coarsest level that still has ``image_size`` pixels across the tile, and the tile's side there.

        :func:`read_level_for` with level-0 pixels as the unit (mpp 1): the wanted resolution is
        ``tile_level0_px / image_size`` level-0 px per training pixel.
        """
        key = (path, tile_level0_px)
        if key not in self._levels:
            level = read_level_for(slide, 1.0, tile_level0_px / self.size)
            px = max(1, round(tile_level0_px / slide.level_downsamples[level]))
            self._levels[key] = (level, px)
        return self._levels[key]

    def _read_tile(self, slide_id: str, path: str, x: int, y: int, tile0: int, level: int, px: int) -> np.ndarray:
        slide = self._slide(slide_id, path)
        if level < 0:
            level, px = self._auto_level(slide, path, tile0)
        elif px < 0:
            px = max(1, round(tile0 / slide.level_downsamples[level]))
        try:
            rgb = read_rgb(slide, (int(x), int(y)), int(level), (int(px), int(px)))
        except ReadError as exc:
            raise undecodable_tile_error(
                slide_id,
                x,
                y,
                level,
                exc,
                fix="the slide file is corrupt; re-export or re-scan it, or remove its pairs",
            ) from exc
        return _resize_square(rgb, self.size)

    def _read_image(self, path: str) -> np.ndarray:
        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(
                f"image {path!r} cannot be read: {exc}", where=f"image {path}", fix="re-export it or remove its row"
            ) from exc
        return _resize_square(rgb, self.size)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[int, torch.Tensor]:
        if self.kind == "slide":
            index, draw = key if isinstance(key, tuple) else (int(key), 0)
            tiles = self.tile_sets[index]
            rng = np.random.default_rng([self.seed, index, draw])
            n = tiles.x.size
            chosen = rng.choice(n, self.bag_size, replace=n < self.bag_size)
            bag = np.stack(
                [
                    self._read_tile(
                        tiles.slide_id,
                        tiles.slide_path,
                        tiles.x[j],
                        tiles.y[j],
                        tiles.tile_level0_px,
                        tiles.read_level,
                        tiles.read_tile_px,
                    )
                    for j in chosen.tolist()
                ]
            )
            return index, torch.from_numpy(bag)
        index = int(key)
        if self.kind == "image":
            return index, torch.from_numpy(self._read_image(self.images[index]))
        x, y, tile0, level, px = self.coords[index].tolist()
        rgb = self._read_tile(self.slide_ids[index], self.slide_paths[index], x, y, tile0, level, px)
        return index, torch.from_numpy(rgb)


def worker_init(_: int) -> None:
    """Each DataLoader worker: one torch thread, and no OpenSlide handles inherited from the parent."""
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, PairImages):
        info.dataset.reset_handles()
