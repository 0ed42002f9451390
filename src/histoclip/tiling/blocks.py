"""Reading grid tiles in blocks: a run of adjacent tiles of one grid row is one reader call.

Why: a grid tile is rarely aligned with the stored tiles of the slide (224-px grid tiles over 256-px JPEG tiles
straddle up to four), so reading tile by tile decodes (or paints) the same stored tile again for each neighbour,
and pays a reader call per tile. A block of adjacent tiles is read once, at the tiles' level, and the tiles are
cut from it; each reader reads the block the way its format allows (:class:`~histoclip.tiling.readers.SlideReader`
``read_rgb``), decoding each stored tile the block overlaps once.

A cut is the same bytes as reading the tile itself only where both start at whole pixels of the level, so a tile
joins a block only when the reader says where its read starts (``pixel_origin``); a tile OpenSlide would resample
(a level-0 position that falls between pixels of a downsampled level) is read on its own, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histoclip.tiling.readers import ReadError, SlideReader
from histoclip.tiling.slide import undecodable_tile_error

#: Widest block read at once, in pixels of the level (bounds the block's memory: 16,384 × 224 px is 11 MB of RGB).
MAX_BLOCK_PX = 16384


@dataclass(frozen=True)
class Block:
    """Tiles ``start:stop`` (of the arrays given to :func:`plan_blocks`) read as one region of ``width`` × ``height``
    pixels at the level, whose top-left is level-0 ``location``; ``columns`` are the tiles' left edges in it."""

    start: int
    stop: int
    location: tuple[int, int]
    width: int
    height: int
    columns: tuple[int, ...]


def plan_blocks(
    slide: SlideReader, xs: np.ndarray, ys: np.ndarray, level: int, tile_px: int, max_block_px: int = MAX_BLOCK_PX
) -> list[Block]:
    """Group tiles (in their order) into blocks: runs of tiles on the same pixel row of the level, each starting at
    most ``tile_px`` to the right of the one before (adjacent or overlapping: a block never reads pixels no tile
    uses), no wider than ``max_block_px``. Tiles without a pixel origin are blocks of one."""
    blocks: list[Block] = []
    current: list[int] = []  # tile indices of the open block
    origins: list[tuple[int, int]] = []

    def close() -> None:
        if not current:
            return
        left = origins[0][0]
        width = origins[-1][0] + tile_px - left
        first = current[0]
        blocks.append(
            Block(
                first,
                current[-1] + 1,
                (int(xs[first]), int(ys[first])),
                width,
                tile_px,
                tuple(origin[0] - left for origin in origins),
            )
        )
        current.clear()
        origins.clear()

    for index, (x, y) in enumerate(zip(xs.tolist(), ys.tolist(), strict=True)):
        origin = slide.pixel_origin((x, y), level)
        if origin is None:
            close()
            blocks.append(Block(index, index + 1, (x, y), tile_px, tile_px, (0,)))
            continue
        if current:
            last = origins[-1]
            joins = (
                origin[1] == last[1]
                and 0 < origin[0] - last[0] <= tile_px
                and origin[0] + tile_px - origins[0][0] <= max_block_px
            )
            if not joins:
                close()
        current.append(index)
        origins.append(origin)
    close()
    return blocks


def read_tiles(
    slide: SlideReader,
    slide_id: str,
    xs: np.ndarray,
    ys: np.ndarray,
    level: int,
    tile_px: int,
    out: np.ndarray,
    max_block_px: int = MAX_BLOCK_PX,
) -> None:
    """Fill ``out`` (len(xs), tile_px, tile_px, 3) with the tiles at level-0 ``xs``, ``ys`` read at ``level``, block by
    block. A block that cannot be decoded is read again tile by tile, so the error names the tile, as a tile-by-tile
    read would (:func:`~histoclip.tiling.slide.undecodable_tile_error`; OpenSlide keeps a handle's first error, so
    there it names the block's first tile)."""
    for block in plan_blocks(slide, xs, ys, level, tile_px, max_block_px):
        try:
            pixels = slide.read_rgb(block.location, level, (block.width, block.height))
        except ReadError:
            _read_one_by_one(slide, slide_id, xs, ys, level, tile_px, out, block)
            continue
        for row, left in zip(range(block.start, block.stop), block.columns, strict=True):
            out[row] = pixels[:, left : left + tile_px]


def _read_one_by_one(
    slide: SlideReader,
    slide_id: str,
    xs: np.ndarray,
    ys: np.ndarray,
    level: int,
    tile_px: int,
    out: np.ndarray,
    block: Block,
) -> None:
    for row in range(block.start, block.stop):
        x, y = int(xs[row]), int(ys[row])
        try:
            out[row] = slide.read_rgb((x, y), level, (tile_px, tile_px))
        except ReadError as exc:
            raise undecodable_tile_error(slide_id, x, y, level, exc) from exc
