"""Contrastive training and fine-tuning of open_clip models on image–text pairs.

What it is for: the demo trains its own tiny CLIP on the synthetic cohort (offline, minutes on two cores),
and a user can fine-tune a registered model on captioned tiles of their own cohort. The result is an
open_clip ``local-dir`` model that the rest of the workflow loads like any other
(``model: local-dir:/path`` in the config, see :mod:`histoclip.embedding.models`).

Pairs come as a table (TSV, or CSV by extension) with a ``caption`` column; the other columns say what the
image is (:func:`read_pairs` tells the kinds apart by their columns):

- **tile pairs** — ``slide_id, x, y, tile_level0_px`` (level-0 top-left corner and side of the tile,
  optional ``read_level``/``read_tile_px``): pixels read with OpenSlide from the slide the cohort sheet names;
- **image-file pairs** — ``image``: a path, relative to the table's folder (or absolute);
- **slide-level pairs** — ``slide_id`` only (a caption per slide, e.g. a report line): each step draws
  ``bag_size`` tiles of the slide from its tile file (``{tiles_dir}/{slide_id}.parquet``, written by the tile
  rule) and the caption is paired with the mean of their embeddings.

An optional ``label`` (or ``tissue_class``) column is kept for the held-in zero-shot check.

How (and why, on a CPU):

- tiles are decoded in DataLoader worker processes, each with its own OpenSlide handles, and resized to the
  training size with PIL there; when the decoded set fits in ``cache_mb`` it is read once (all cores) and
  the steps then run from memory (measured on 2 cores: decoding and resizing a 224-px tile costs about a
  quarter of the demo model's training step on it at 112 px, and a run sees each tile ~10 times);
- augmentation (the 8 flips/90° rotations — histology has no orientation — and mild stain/brightness/
  contrast/saturation jitter) and normalisation with the model's mean/std run on the batch, on the device,
  with random numbers from a seeded CPU generator, so batches and augmentations are the same whatever the
  number of workers (a step-bounded run repeated with the same threads gives identical weights);
- loss: open_clip's ``ClipLoss`` (symmetric InfoNCE with the model's learnt temperature, clamped to a logit
  scale of at most 100), AdamW (no weight decay on gains, biases and the temperature), linear warm-up then
  cosine to 0 over the budget. The budget is ``steps`` and/or ``max_seconds`` (wall time of the whole call
  up to the last step, loading and reading included), whichever runs out first; with a time budget the
  schedule is laid over the steps the time is expected to allow at the recent step rate (see
  ``_Progress``), so only a step-bounded run (``max_seconds=None``) is bit-reproducible.

Output (``out_dir``, written into a temporary folder beside it and renamed into place only when complete):
``open_clip_config.json`` (``model_cfg`` with the training image size, ``preprocess_cfg``),
``open_clip_model.safetensors``, ``loss.tsv`` (step, loss, lr, seconds), ``loss.png`` and ``train.json``
(settings, data counts, base model and its weights' sha256, results, package versions). The saved folder
is reloaded through :func:`histoclip.embedding.models.load_model` before it is renamed into place, and must give the
same embeddings as the model in memory.

A loss in the 3s is not failure: with ``k`` same-class pairs in a batch of ``B`` (the same caption or class
repeats) the contrastive loss cannot go below about ``ln(B / k)``.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from histoclip import formats, store
from histoclip.demo.synth import (
    CAPTION_MIN_PURITY,
    CAPTION_TEMPLATES,
    CLASS_SYNONYMS,
    TISSUE_CLASSES,
    read_class_map,
)
from histoclip.embedding.models import LoadedModel, ModelSpec, hub_offline, load_model, resolve_device
from histoclip.errors import InputError
from histoclip.sheets import read_cohort_sheet, read_table
from histoclip.tiling.slide import undecodable_tile_error
from histoclip.zeroshot.classifier import class_weights

__all__ = [
    "PAIR_KINDS",
    "TrainReport",
    "TrainSettings",
    "demo_pairs",
    "image_folder_pairs",
    "pair_kind",
    "prompts_from_synonyms",
    "read_pairs",
    "train_clip",
]

_log = logging.getLogger(__name__)

PAIR_KINDS = ("tile", "image", "slide")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
#: CLIP's cap on the learnt temperature (logit scale), as in open_clip's training loop.
MAX_LOGIT_SCALE = 100.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
#: Pairs at most encoded for the held-in zero-shot check.
MAX_EVAL_PAIRS = 2048
_MAX_LISTED_PROBLEMS = 20
_LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------------
# Settings and report


@dataclass(frozen=True)
class TrainSettings:
    """How to train. Defaults: the demo's tiny CLIP from scratch on two CPU cores (see RECIPES)."""

    steps: int | None = None  # stop after this many optimizer steps, or ...
    max_seconds: float | None = 170  # ... after this wall time (whichever first); at least one must be set
    batch_size: int = 128
    lr: float = 1e-3  # AdamW; fine-tuning a pretrained model wants ~1e-5
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1  # linear warm-up over this fraction of the budget, then cosine to 0
    image_size: int | None = 112  # train (and save) at this input size, tiles downsampled; None: the model's
    augment: bool = True  # flips/90° rotations, mild colour jitter
    seed: int = 0
    precision: str = "auto"  # AMP bf16 on CUDA, fp32 on CPU
    num_workers: int | str = "auto"
    bag_size: int = 16  # slide-level pairs: tiles sampled per slide per step, embeddings mean-pooled
    cache_mb: float = 2048  # keep decoded tiles in memory when they fit (tile and image pairs)
    log_every: int = 25  # steps between progress lines

    def __post_init__(self) -> None:
        problems = []
        if self.steps is None and self.max_seconds is None:
            problems.append("neither steps nor max_seconds is set (training would never stop)")
        if self.steps is not None and self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            problems.append(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 (a contrastive batch needs negatives), got {self.batch_size}")
        if not self.lr > 0 or self.weight_decay < 0:
            problems.append(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if not 0 <= self.warmup_fraction < 1:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.image_size is not None and self.image_size < 16:
            problems.append(f"image_size must be >= 16 px, got {self.image_size}")
        if self.precision not in TRAIN_PRECISIONS:
            problems.append(f"precision must be one of {TRAIN_PRECISIONS}, got {self.precision!r}")
        if self.num_workers != "auto" and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            problems.append(f"num_workers must be 'auto' or an integer >= 0, got {self.num_workers!r}")
        if self.bag_size < 1:
            problems.append(f"bag_size must be >= 1, got {self.bag_size}")
        if problems:
            raise InputError(
                "; ".join(problems),
                where="training settings",
                fix="set steps and/or max_seconds, and values in the ranges given",
            )


@dataclass
class TrainReport:
    """What a run did. ``last_loss`` is the mean of the last 10 steps' losses."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    n_pairs: int
    out_dir: Path
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    stopped_by: str = ""
    held_in: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Pair tables


def pair_kind(pairs: pd.DataFrame) -> str:
    """``image``, ``tile`` or ``slide``, from the columns of a table returned by :func:`read_pairs`."""
    if "image" in pairs.columns:
        return "image"
    if "x" in pairs.columns:
        return "tile"
    if "slide_id" in pairs.columns:
        return "slide"
    raise InputError(
        f"a pair table needs an 'image' or a 'slide_id' column; found {list(pairs.columns)}",
        where="pairs",
        fix="read the table with histoclip.training.train.read_pairs",
    )


def _raise_problems(problems: list[str], what: str, fix: str) -> None:
    if not problems:
        return
    shown = problems[:_MAX_LISTED_PROBLEMS]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise InputError(f"{len(problems)} problem(s) in {what}:\n  - " + "\n  - ".join(shown) + more, fix=fix)


def _int_cell(value: str, where: str, column: str, problems: list[str], *, minimum: int) -> int | None:
    try:
        number = int(value)
    except ValueError:
        try:
            number = int(float(value)) if float(value).is_integer() else None
        except ValueError:
            number = None
    if number is None or number < minimum:
        problems.append(f"{where}, column {column!r}: {value!r} is not an integer >= {minimum}")
        return None
    return number


def _label_column(table: pd.DataFrame) -> list[str]:
    for column in ("label", "tissue_class"):
        if column in table.columns:
            return table[column].tolist()
    return [""] * len(table)


def read_pairs(
    table_path: str | os.PathLike[str],
    *,
    sheet_path: str | os.PathLike[str] | None = None,
    split: str | None = "train",
    tiles_dir: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Read and check a pair table; return one row per usable pair, with absolute paths.

    The kind is told by the columns (see the module docstring): ``image`` → image-file pairs;
    ``slide_id, x, y, tile_level0_px`` → tile pairs; ``slide_id`` alone → slide-level pairs. Tile and
    slide-level pairs name slides, which are looked up in the cohort sheet (``sheet_path``, default
    ``slides.tsv`` beside the table; paths in it are relative to its folder). When the sheet has a ``split``
    column only rows whose slide is in ``split`` are kept (``split=None`` keeps all); an image table may
    carry its own ``split`` column. Slide-level pairs need a tile file per slide: given ``tiles_dir``, their
    presence is checked here, otherwise when training.

    Every problem (missing column, empty caption, bad coordinate, unknown slide, missing file) is reported
    with its file and line, all at once, as an :class:`InputError`. The returned frame keeps the source
    line of each row in ``line`` and says where it came from in ``frame.attrs``.
    """
    path = Path(table_path)
    table = read_table(path, kind="pair table", required=("caption",))
    columns = set(table.columns)
    if "image" in columns:
        kind = "image"
    elif "slide_id" in columns and columns & {"x", "y", "tile_level0_px"}:
        kind = "tile"
        missing = [c for c in ("x", "y", "tile_level0_px") if c not in columns]
        if missing:
            raise InputError(
                f"tile pairs need the columns slide_id, x, y, tile_level0_px; missing {missing}",
                where=f"pair table {path}",
                fix="add them: level-0 pixel coordinates of each tile's top-left corner and its side in level-0 px",
            )
    elif "slide_id" in columns:
        kind = "slide"
    else:
        raise InputError(
            f"cannot tell which images the captions belong to; found columns {list(table.columns)}",
            where=f"pair table {path}",
            fix="add an 'image' column (image files), or 'slide_id' (+ 'x', 'y', 'tile_level0_px' for tiles)",
        )

    problems: list[str] = []
    lines = [int(i) + 2 for i in table.index]  # the header is line 1
    captions = table["caption"].tolist()
    labels = _label_column(table)
    for line, caption in zip(lines, captions, strict=True):
        if not caption:
            problems.append(f"{path}, line {line}, column 'caption': empty caption")

    attrs: dict[str, Any] = {"kind": kind, "table": str(path.resolve()), "rows_in_table": len(table), "split": split}
    if kind == "image":
        base = path.resolve().parent
        keep = np.ones(len(table), bool)
        if split is not None and "split" in columns:
            keep = (table["split"] == split).to_numpy()
            attrs["split_applied"] = True
        images: list[str] = []
        for line, value, kept in zip(lines, table["image"].tolist(), keep, strict=True):
            image = Path(os.path.expanduser(value)) if value else None
            if image is not None and not image.is_absolute():
                image = base / image
            images.append(str(image) if image else "")
            if not kept:
                continue
            if image is None:
                problems.append(f"{path}, line {line}, column 'image': empty image path")
            elif not image.is_file():
                problems.append(f"{path}, line {line}, column 'image': image file {str(image)!r} does not exist")
        _raise_problems(
            problems,
            f"pair table {path}",
            "give every row a caption and an existing image file (relative paths are relative to the table's folder)",
        )
        out = pd.DataFrame({"image": images, "caption": captions, "label": labels, "line": lines})[keep]
    else:
        sheet = Path(sheet_path) if sheet_path is not None else path.parent / "slides.tsv"
        if not sheet.is_file():
            raise InputError(
                f"{kind} pairs name slides, so they need the cohort sheet, and {str(sheet)!r} does not exist",
                where=f"pair table {path}",
                fix="pass sheet_path= (the cohort's slides.tsv: slide_id, patient_id, path[, split])",
            )
        records = {r.slide_id: r for r in read_cohort_sheet(sheet)}
        attrs["sheet"] = str(sheet.resolve())
        use_split = split is not None and any("split" in r.extra for r in records.values())
        attrs["split_applied"] = use_split
        slide_ids = table["slide_id"].tolist()
        keep = np.zeros(len(table), bool)
        rows: dict[str, list[Any]] = {"slide_id": [], "slide_path": []}
        for i, (line, slide_id) in enumerate(zip(lines, slide_ids, strict=True)):
            record = records.get(slide_id)
            rows["slide_id"].append(slide_id)
            rows["slide_path"].append(str(record.path) if record else "")
            if record is None:
                problems.append(
                    f"{path}, line {line}, column 'slide_id': slide {slide_id!r} is not in the cohort sheet {sheet}"
                )
                continue
            keep[i] = not use_split or record.extra.get("split") == split
        if kind == "tile":
            for column, minimum in (("x", 0), ("y", 0), ("tile_level0_px", 1)):
                rows[column] = [
                    _int_cell(v, f"{path}, line {line}", column, problems, minimum=minimum)
                    for line, v in zip(lines, table[column].tolist(), strict=True)
                ]
            for column, minimum in (("read_level", 0), ("read_tile_px", 1)):
                values = table[column].tolist() if column in columns else [""] * len(table)
                rows[column] = [
                    _int_cell(v, f"{path}, line {line}", column, problems, minimum=minimum) if v else -1
                    for line, v in zip(lines, values, strict=True)
                ]
        elif tiles_dir is not None:
            rows["tiles_path"] = []
            for i, (line, slide_id) in enumerate(zip(lines, slide_ids, strict=True)):
                tiles = Path(tiles_dir) / f"{slide_id}.parquet"
                rows["tiles_path"].append(str(tiles))
                if keep[i] and not tiles.is_file():
                    problems.append(f"{path}, line {line}: tile file {str(tiles)!r} of slide {slide_id!r} is missing")
        _raise_problems(
            problems,
            f"pair table {path}",
            f"every slide_id must be in the cohort sheet {sheet} (add the slide or remove the row), every caption "
            "non-empty, coordinates non-negative integers in level-0 pixels; slide-level pairs need the tile rule "
            "to have run for their slides",
        )
        out = pd.DataFrame({**rows, "caption": captions, "label": labels, "line": lines})[keep]
    out = out.reset_index(drop=True)
    if out.empty:
        raise InputError(
            f"no pairs left in split {split!r} ({len(table)} rows in the table)",
            where=f"pair table {path}",
            fix="check the sheet's split column, or pass split=None to use every row",
        )
    for column in ("x", "y", "tile_level0_px", "read_level", "read_tile_px"):
        if column in out.columns:
            out[column] = out[column].astype(np.int64)
    out.attrs.update(attrs)
    return out


def _slide_pairs_with_tiles(pairs: pd.DataFrame, tiles_dir: str | os.PathLike[str] | None) -> pd.DataFrame:
    if "tiles_path" in pairs.columns and (pairs["tiles_path"] != "").all():
        return pairs
    if tiles_dir is None:
        raise InputError(
            "slide-level pairs need each slide's tile file, and no tiles_dir was given",
            where="train_clip",
            fix="pass tiles_dir= (the tile rule's results/tiles folder)",
        )
    pairs = pairs.copy()
    pairs["tiles_path"] = [str(Path(tiles_dir) / f"{s}.parquet") for s in pairs["slide_id"]]
    missing = [p for p in pairs["tiles_path"] if not Path(p).is_file()]
    if missing:
        raise InputError(
            f"{len(missing)} tile file(s) missing, e.g. {missing[0]!r}",
            where="train_clip",
            fix="run the tile rule for these slides first, or remove them from the pair table",
        )
    return pairs


# --------------------------------------------------------------------------------------------------
# Reading pixels


@dataclass(frozen=True)
class _TileSet:
    """The tiles of one slide (from its tile file), for slide-level pairs."""

    slide_id: str
    slide_path: str
    x: np.ndarray
    y: np.ndarray
    read_level: int
    read_tile_px: int
    tile_level0_px: int


def _read_tile_set(slide_id: str, slide_path: str, tiles_path: str) -> _TileSet:
    x, y, meta = formats.read_tile_file(tiles_path)
    if len(x) == 0:
        raise InputError(
            f"the tile file {tiles_path!r} of slide {slide_id!r} has no tiles ({meta.get('error') or 'no tissue'})",
            where=f"slide {slide_id!r}",
            fix="remove the slide from the pair table or fix its tiling",
        )
    return _TileSet(
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
    from PIL import Image

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
    (a handle can't cross a fork) and kept; ``_worker_init`` drops any inherited from the parent.
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
        tile_sets: Sequence[_TileSet] | None = None,
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
        from histoclip.tiling.slide import open_wsi

        if path not in self._handles:
            if len(self._handles) >= 16:
                self._handles.pop(next(iter(self._handles))).close()
            self._handles[path] = open_wsi(path, slide_id)
        return self._handles[path]

    def _auto_level(self, slide: Any, path: str, tile_level0_px: int) -> tuple[int, int]:
        key = (path, tile_level0_px)
        if key not in self._levels:
            level = 0  # the coarsest level that still has image_size pixels across the tile
            for i, d in enumerate(slide.level_downsamples):
                if tile_level0_px / d >= self.size - 1e-6 and d > slide.level_downsamples[level]:
                    level = i
            px = max(1, round(tile_level0_px / slide.level_downsamples[level]))
            self._levels[key] = (level, px)
        return self._levels[key]

    def _read_tile(self, slide_id: str, path: str, x: int, y: int, tile0: int, level: int, px: int) -> np.ndarray:
        import openslide

        slide = self._slide(slide_id, path)
        if level < 0:
            level, px = self._auto_level(slide, path, tile0)
        elif px < 0:
            px = max(1, round(tile0 / slide.level_downsamples[level]))
        try:
            rgba = np.asarray(slide.read_region((int(x), int(y)), int(level), (int(px), int(px))))
        except openslide.OpenSlideError as exc:
            raise undecodable_tile_error(
                slide_id,
                x,
                y,
                level,
                exc,
                fix="the slide file is corrupt; re-export or re-scan it, or remove its pairs",
            ) from exc
        rgb = rgba[..., :3].copy()
        transparent = rgba[..., 3] == 0
        if transparent.any():  # unscanned area: white, as on glass
            rgb[transparent] = 255
        return _resize_square(rgb, self.size)

    def _read_image(self, path: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

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


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, PairImages):
        info.dataset.reset_handles()


class _EpochBatches:
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
        worker_init_fn=_worker_init if workers else None,
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


# --------------------------------------------------------------------------------------------------
# Augmentation and normalisation (on the device, random numbers from a seeded CPU generator)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 or float NHWC (0-255) → float NHWC: random dihedral transform + mild colour jitter per image."""
    n = images.shape[0]
    device = images.device
    x = images.float()
    rotation = torch.randint(0, 4, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator)
    out = torch.empty_like(x)
    for k in range(4):
        for f in (0, 1):
            index = torch.nonzero((rotation == k) & (flip == f)).flatten()
            if index.numel() == 0:
                continue
            index = index.to(device)
            part = x.index_select(0, index)
            if f:
                part = part.flip(2)
            if k:
                part = torch.rot90(part, k, dims=(1, 2))
            out.index_copy_(0, index, part)

    def uniform(shape: tuple[int, ...], amount: float) -> torch.Tensor:
        return (1 + amount * (2 * torch.rand(shape, generator=generator) - 1)).to(device)

    out = out * uniform((n, 1, 1, 3), 0.05) * uniform((n, 1, 1, 1), 0.1)  # stain colour, brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * uniform((n, 1, 1, 1), 0.1) + mean  # contrast
    gray = (out * torch.tensor(_LUMA, device=device)).sum(-1, keepdim=True)
    out = gray + (out - gray) * uniform((n, 1, 1, 1), 0.15)  # saturation
    return out.clamp_(0, 255)


# --------------------------------------------------------------------------------------------------
# Zero-shot helpers


def prompts_from_synonyms(
    synonyms: Mapping[str, Sequence[str]] = CLASS_SYNONYMS, templates: Sequence[str] = CAPTION_TEMPLATES
) -> dict[str, list[str]]:
    """Per class, every template × synonym (the demo's captions are drawn from the same product)."""
    return {name: [t.format(s) for s in words for t in templates] for name, words in synonyms.items()}


@torch.inference_mode()
def _encode(model: LoadedModel, images: torch.Tensor, bag: bool) -> torch.Tensor:
    """Normalised embeddings of uint8 NHWC images ([N, bag, S, S, 3] pooled per item when ``bag``)."""
    if not bag:
        return model.encode_tiles(images.to(model.device))
    n, k = images.shape[:2]
    tiles = model.encode_tiles(images.reshape(n * k, *images.shape[2:]).to(model.device))
    return F.normalize(tiles.view(n, k, -1).mean(1), dim=-1)


def _zero_shot(
    model: LoadedModel,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    labels: Sequence[str],
    prompts: Any,
    bag: bool,
) -> dict[str, Any]:
    names, weights = class_weights(lambda texts: model.encode_texts(texts).cpu(), prompts, what="class prompts")
    classifier = torch.from_numpy(weights).float()
    predicted: list[int] = []
    for _, images in batches:
        scores = _encode(model, images, bag) @ classifier.T.to(model.device)
        predicted.extend(scores.argmax(1).tolist())
    truth = np.array([names.index(label) for label in labels])
    guess = np.array(predicted)
    recall = {names[c]: float((guess[truth == c] == c).mean()) for c in np.unique(truth)}
    return {
        "held_in": True,
        "note": "zero-shot on pairs the model was trained on (held-in): checks the pipeline, not generalisation",
        "n": int(truth.size),
        "accuracy": float((guess == truth).mean()),
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "recall_per_class": recall,
        "classes": names,
    }


# --------------------------------------------------------------------------------------------------
# Training


def _base_model_cfg(spec: ModelSpec) -> dict[str, Any]:
    """The open_clip model config of the base model (what the saved folder's ``model_cfg`` starts from)."""
    import open_clip

    if spec.model.endswith(".json"):
        cfg = json.loads(Path(spec.model).read_text())
        cfg = cfg.get("model_cfg", cfg)
    else:
        with hub_offline(not spec.allow_download):
            cfg = open_clip.get_model_config(spec.model)
    if not cfg:
        raise InputError(
            f"cannot find the open_clip config of {spec.model!r}",
            where=f"base model {spec.name!r}",
            fix="use a built-in architecture, local-dir:, a cached hf-hub: model or a JSON config",
        )
    return copy.deepcopy(dict(cfg))


def _train_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on gains, biases, norms and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class _Progress:
    """Fraction of the budget used before each step, for the learning-rate schedule.

    With ``steps``: the step count. With ``max_seconds``: the steps done over the steps expected in all, the
    rest estimated from the recent step rate (last 20 steps), and 1 at the deadline. At a steady speed that
    is the elapsed fraction of the time; when the speed changes (another job takes or frees the cores) the
    rest of the schedule is laid over the steps that are actually coming: after a slow start the warm-up and
    peak are not spent on a handful of steps (the schedule may step back, a warm restart), and when steps
    slow down the decay speeds up so as to reach 0 at the deadline. Measured on the demo, cores shared for
    the first minute: a schedule by elapsed time gave 0.65 slide accuracy after 154 steps.
    """

    def __init__(self, steps: int | None, deadline: float | None, started: float) -> None:
        self.steps, self.deadline = steps, deadline
        self.times = collections.deque([started], maxlen=21)

    def before_step(self, step: int, now: float) -> float:
        progress = (step + 1) / self.steps if self.steps is not None else 0.0
        if self.deadline is not None and step > 0:
            rate = (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)
            remaining_steps = max(self.deadline - now, 0.0) * rate
            progress = max(progress, (step + 1) / (step + 1 + remaining_steps))
        return min(1.0, progress)

    def after_step(self, now: float) -> None:
        self.times.append(now)


def _adamw(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel: on 2 CPU cores the default per-tensor loop spends 0.1-0.3 s
    per step on the demo model's 7.6 M parameters (most in the token embedding), the fused one 0.01 s."""
    groups = _param_groups(model, settings.weight_decay)
    options = {"lr": settings.lr, "betas": (0.9, 0.98), "eps": 1e-6}
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(_param_groups(model, settings.weight_decay), foreach=True, **options)


def _lr_at(progress: float, settings: TrainSettings) -> float:
    warm = settings.warmup_fraction
    if warm > 0 and progress < warm:
        return settings.lr * progress / warm
    t = min(1.0, (progress - warm) / (1 - warm)) if warm < 1 else 1.0
    return settings.lr * 0.5 * (1 + math.cos(math.pi * t))


def _plot_loss(path: Path, rows: list[tuple[int, float, float, float]], batch_size: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.array([r[0] for r in rows])
    loss = np.array([r[1] for r in rows])
    lr = np.array([r[2] for r in rows])
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="loss")
    window = max(1, len(loss) // 20)
    if len(loss) >= window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="tab:blue", lw=2, label=f"running mean ({window} steps)")
    ax.axhline(math.log(batch_size), color="grey", ls="--", lw=1, label=f"chance, ln({batch_size})")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.legend(loc="upper right", fontsize=8)
    twin = ax.twinx()
    twin.plot(steps, lr, color="tab:orange", lw=1)
    twin.set_ylabel("learning rate", color="tab:orange")
    figure.tight_layout()
    figure.savefig(path, format="png")


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder over ``final`` (a previous output is moved aside, then deleted)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _check_reload(folder: Path, model: LoadedModel, probe: torch.Tensor, bag: bool) -> None:
    """The saved folder must load through histoclip.embedding.models and embed like the model in memory."""
    reloaded = load_model(ModelSpec("reload-check", f"local-dir:{folder}", precision="fp32"), model.device)
    saved_dtype, model.autocast_dtype = model.autocast_dtype, None
    try:
        expected = _encode(model, probe, bag)
        got = _encode(reloaded, probe, bag)
    finally:
        model.autocast_dtype = saved_dtype
    if reloaded.image_size != model.image_size or not torch.allclose(expected, got, atol=1e-4):
        raise RuntimeError(
            f"the saved model in {folder} does not reproduce the trained one (image size {reloaded.image_size} vs "
            f"{model.image_size}, max difference {float((expected - got).abs().max()):.3g})"
        )


class _Images:
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
            pairs = _slide_pairs_with_tiles(pairs, tiles_dir)
            sets: dict[str, _TileSet] = {}
            for slide_id, slide_path, tiles_path in pairs[["slide_id", "slide_path", "tiles_path"]].itertuples(
                index=False
            ):
                if slide_id not in sets:
                    sets[slide_id] = _read_tile_set(slide_id, slide_path, tiles_path)
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

    def batches(self, keys: _EpochBatches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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


def _write_model(
    folder: Path, model: LoadedModel, model_cfg: dict[str, Any], rows: list[tuple[int, float, float, float]], batch: int
) -> None:
    """open_clip local-dir files, the loss curve as TSV and PNG."""
    from safetensors.torch import save_file

    preprocess_cfg = {
        **(getattr(model.model.visual, "preprocess_cfg", None) or {}),
        "size": model.image_size,
        "mean": list(model.mean),
        "std": list(model.std),
        "interpolation": model.interpolation,
    }
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n", encoding="utf-8"
    )
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors", metadata={"format": "pt"})
    with open(folder / "loss.tsv", "w", encoding="utf-8") as fh:
        fh.write("step\tloss\tlr\tseconds\n")
        for step, loss, lr, seconds in rows:
            fh.write(f"{step}\t{loss:.6g}\t{lr:.6g}\t{seconds:.3f}\n")
    _plot_loss(folder / "loss.png", rows, batch)


def _held_in(
    loaded: LoadedModel,
    images: _Images,
    pairs: pd.DataFrame,
    class_prompts: Mapping[str, Sequence[str]],
    seed: int,
    logger: logging.Logger,
) -> dict[str, Any] | None:
    usable = [i for i, label in enumerate(pairs["label"].tolist()) if label in class_prompts]
    if not usable:
        logger.warning("no training pair has a label among the class prompts: no held-in zero-shot check")
        return None
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(usable, min(MAX_EVAL_PAIRS, len(usable)), replace=False).tolist())
    result = _zero_shot(loaded, images.pixels(chosen), pairs["label"].iloc[chosen].tolist(), class_prompts, images.bag)
    logger.info(
        "held-in zero-shot on %d training pairs: accuracy %.3f, balanced %.3f",
        result["n"],
        result["accuracy"],
        result["balanced_accuracy"],
    )
    return result


def train_clip(
    pairs: pd.DataFrame | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base: ModelSpec | str | os.PathLike[str],
    settings: TrainSettings = TrainSettings(),
    device: str = "auto",
    tiles_dir: str | os.PathLike[str] | None = None,
    log: logging.Logger | None = None,
    class_prompts: Mapping[str, Sequence[str]] | None = None,
) -> TrainReport:
    """Train (``base`` = a JSON model config: from scratch) or fine-tune (``base`` = a registered model with
    weights) an open_clip model on ``pairs`` and write it to ``out_dir`` (see the module docstring).

    ``pairs``: a frame from :func:`read_pairs`, or the path of a pair table (read with its defaults).
    ``class_prompts`` (class → prompts, e.g. :func:`prompts_from_synonyms`): after training, a zero-shot
    check on up to 2,048 of the training pairs whose ``label`` is a class — *held-in*, so it checks that the
    pipeline learnt its captions, not that it generalises — reported in ``train.json`` and the report.
    """
    started = time.perf_counter()
    logger = log or _log
    if not isinstance(pairs, pd.DataFrame):
        pairs = read_pairs(pairs, tiles_dir=tiles_dir)
    if pairs.empty:
        raise InputError("no pairs to train on", where="train_clip", fix="check the pair table and split")
    if "label" not in pairs.columns:
        pairs = pairs.assign(label="")
    kind = pair_kind(pairs)
    bag = kind == "slide"
    if isinstance(base, str | os.PathLike):
        base = ModelSpec(Path(base).stem, str(base))
    dev = resolve_device(device)
    dtype = _train_dtype(settings.precision, dev)
    deadline = started + settings.max_seconds if settings.max_seconds is not None else None

    # Model: loaded through the registry (weights, offline rules, provenance), at the training size.
    torch.manual_seed(settings.seed)
    spec = dataclasses.replace(base, image_size=settings.image_size or base.image_size, seed=settings.seed)
    loaded = load_model(spec, dev)
    model = loaded.model
    model_cfg = _base_model_cfg(base)
    model_cfg["vision_cfg"]["image_size"] = loaded.image_size
    logger.info(
        "training %s (%s, %.1f M parameters) at %d px on %s, %d %s pairs",
        base.name,
        loaded.weights,
        sum(p.numel() for p in model.parameters()) / 1e6,
        loaded.image_size,
        dev.type,
        len(pairs),
        kind,
    )

    # Text: every distinct caption tokenised once. Images: see _Images.
    unique_captions, caption_index = np.unique(pairs["caption"].to_numpy(dtype=str), return_inverse=True)
    tokens = loaded.tokenizer(list(unique_captions))
    truncated = int((tokens[:, -1] != 0).sum())
    if truncated:
        logger.warning("%d distinct caption(s) fill the context length and may be truncated", truncated)
    tokens = tokens.to(dev)
    caption_index_t = torch.from_numpy(caption_index.astype(np.int64)).to(dev)
    images = _Images(pairs, loaded.image_size, settings, dev, tiles_dir, logger)
    keys = _EpochBatches(len(pairs), settings.batch_size, settings.seed, bag)
    if keys.batch_size < settings.batch_size:
        logger.warning("only %d pairs: batches of %d instead of %d", len(pairs), keys.batch_size, settings.batch_size)

    import open_clip.loss

    logit_bias = getattr(model, "logit_bias", None)
    loss_fn = open_clip.loss.SigLipLoss() if logit_bias is not None else open_clip.loss.ClipLoss()
    optimizer = _adamw(model, settings)
    augment_generator = torch.Generator().manual_seed(settings.seed + 1)
    rows: list[tuple[int, float, float, float]] = []
    previous_threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(images.torch_threads)
    train_started = time.perf_counter()
    schedule = _Progress(settings.steps, deadline, train_started)
    stopped_by, step, images_seen = "steps", 0, 0
    model.train()
    iterator = images.batches(keys)
    try:
        while True:
            now = time.perf_counter()
            if settings.steps is not None and step >= settings.steps:
                break
            if deadline is not None and step > 0 and now >= deadline:
                stopped_by = "max_seconds"
                break
            lr = _lr_at(schedule.before_step(step, now), settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index, pixels = next(iterator)
            pixels = pixels.to(dev, non_blocking=True)
            flat = pixels.reshape(-1, *pixels.shape[-3:]) if bag else pixels
            if settings.augment:
                flat = _augment(flat, augment_generator)
            x = loaded.preprocess_on_device(flat)
            text = tokens.index_select(0, caption_index_t.index_select(0, index.to(dev)))
            with torch.autocast(device_type=dev.type, dtype=dtype, enabled=dtype is not None):
                image_features = model.encode_image(x)
                text_features = model.encode_text(text)
            image_features = F.normalize(image_features.float(), dim=-1)
            if bag:  # slide embedding = mean of its tiles' embeddings
                image_features = F.normalize(image_features.view(index.numel(), -1, image_features.shape[-1]).mean(1))
            text_features = F.normalize(text_features.float(), dim=-1)
            extra = (logit_bias,) if logit_bias is not None else ()
            loss = loss_fn(image_features, text_features, model.logit_scale.exp(), *extra)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
            value = float(loss.item())
            if not math.isfinite(value):
                raise RuntimeError(
                    f"the loss became {value} at step {step + 1} (lr {lr:.3g}); lower lr or use precision fp32"
                )
            step += 1
            images_seen += int(flat.shape[0])
            done = time.perf_counter()
            schedule.after_step(done)
            rows.append((step, value, lr, done - train_started))
            if settings.log_every and (step == 1 or step % settings.log_every == 0):
                elapsed = time.perf_counter() - train_started
                logger.info("step %d loss %.4f lr %.2e %.0f img/s", step, value, lr, images_seen / max(elapsed, 1e-9))
    finally:
        del iterator
        torch.set_num_threads(previous_threads)
    train_seconds = time.perf_counter() - train_started
    model.eval()
    losses = [r[1] for r in rows]
    first_loss, last_loss = losses[0], float(np.mean(losses[-10:]))
    images_per_second = images_seen / max(train_seconds, 1e-9)
    logger.info(
        "trained %d steps in %.1f s (%.0f img/s, stopped by %s): loss %.3f -> %.3f",
        step,
        train_seconds,
        images_per_second,
        stopped_by,
        first_loss,
        last_loss,
    )
    held_in = _held_in(loaded, images, pairs, class_prompts, settings.seed, logger) if class_prompts else None

    # Save into a temp folder beside out_dir, check that it reloads, then rename it into place.
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~store._UMASK)
        _write_model(tmp, loaded, model_cfg, rows, keys.batch_size)
        _check_reload(tmp, loaded, next(iter(images.pixels(list(range(min(4, len(pairs)))))))[1], bag)
        labels = pairs["label"][pairs["label"] != ""].value_counts().to_dict()
        table = pairs.attrs.get("table")
        description = {
            "what": "open_clip model trained by histoclip.train.train_clip",
            "load_with": {"model": f"local-dir:{out.resolve()}"},
            "settings": dataclasses.asdict(settings),
            "base": {
                "name": base.name,
                "model": base.model,
                "pretrained": base.pretrained,
                "architecture": loaded.architecture,
                "weights": loaded.weights,
                "weights_sha256": loaded.weights_sha256,
                "from_scratch": loaded.weights.startswith("random-init"),
            },
            "data": {
                "kind": kind,
                "table": table,
                "table_sha256": store.sha256_file(table) if table and Path(table).is_file() else None,
                "sheet": pairs.attrs.get("sheet"),
                "split": pairs.attrs.get("split"),
                "split_applied": pairs.attrs.get("split_applied"),
                "n_pairs": len(pairs),
                "n_slides": int(pairs["slide_id"].nunique()) if "slide_id" in pairs.columns else 0,
                "n_unique_captions": len(unique_captions),
                "labels": {str(k): int(v) for k, v in labels.items()},
                "images_cached": images.cached,
            },
            "training": {
                "device": dev.type,
                "autocast": str(dtype).replace("torch.", "") if dtype else "fp32",
                "torch_threads": images.torch_threads if dev.type == "cpu" else None,
                "workers": images.workers,
                "image_size": loaded.image_size,
                "batch_size": keys.batch_size,
                "loss": type(loss_fn).__name__,
                "steps": step,
                "stopped_by": stopped_by,
                "train_seconds": round(train_seconds, 3),
                "seconds_before_training": round(train_started - started, 3),
                "images_per_second": round(images_per_second, 2),
                "first_loss": first_loss,
                "last_loss_mean_of_last_10": last_loss,
                "final_logit_scale": float(model.logit_scale.exp().item()),
            },
            "held_in_zero_shot": held_in,
            "versions": store.package_versions(),
        }
        (tmp / "train.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        for child in tmp.iterdir():
            os.chmod(child, 0o666 & ~store._UMASK)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TrainReport(
        steps=step,
        seconds=time.perf_counter() - started,
        first_loss=first_loss,
        last_loss=last_loss,
        n_pairs=len(pairs),
        out_dir=out,
        train_seconds=train_seconds,
        images_per_second=images_per_second,
        stopped_by=stopped_by,
        held_in=held_in,
    )


# --------------------------------------------------------------------------------------------------
# Pair tables for the demo and for folder-per-class image sets


def _write_pairs(path: str | os.PathLike[str], frame: pd.DataFrame) -> None:
    with store.atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, lineterminator="\n")


def _caption(rng: np.random.Generator, phrases: Sequence[str], templates: Sequence[str]) -> str:
    text = templates[int(rng.integers(len(templates)))].format(phrases[int(rng.integers(len(phrases)))])
    return text[0].upper() + text[1:]


def demo_pairs(
    cohort_root: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    *,
    split: str | None = "train",
    tiles_per_class: int = 700,
    candidates_per_slide: int = 4000,
    include_captions: bool = True,
    min_purity: float = CAPTION_MIN_PURITY,
    seed: int = 0,
) -> pd.DataFrame:
    """Tile–caption pairs for training the demo CLIP on a cohort from :func:`histoclip.demo.synth.make_demo_cohort`.

    The cohort's ``captions.tsv`` has a few hundred pairs on a fixed grid, with the rare classes (fat,
    lymphocytes) down to a dozen or two in the train split: too few for a CLIP. This adds tiles at random
    level-0 offsets on the ``split`` slides whose area is at least ``min_purity`` one tissue class (from the
    class maps; background excluded), with captions drawn like the cohort's (a template × a synonym of the
    class, :data:`~histoclip.demo.synth.CAPTION_TEMPLATES` × :data:`~histoclip.demo.synth.CLASS_SYNONYMS`), and caps
    every class at ``tiles_per_class`` pairs so that rare classes are not drowned out (the cohort's own
    captions are kept first). Tiles have the caption tiles' physical size (``caption_tile_um`` in
    ``cohort.json``).

    Columns: ``slide_id, x, y, tile_level0_px, tissue_class, caption, source`` (``captions.tsv`` or
    ``sampled``), sorted by slide and position; deterministic for a seed. Written as TSV (atomically) to
    ``out_path`` when given; read it back with ``read_pairs(out_path, sheet_path=cohort_root/"slides.tsv")``.
    """
    root = Path(cohort_root)
    sheet = read_table(root / "slides.tsv", kind="cohort sheet", required=("slide_id", "path"))
    try:
        description = json.loads((root / "cohort.json").read_text())
        tile0 = int(round(float(description["caption_tile_um"]) / float(description["mpp"])))
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(
            f"cannot read the tile size from {root / 'cohort.json'} ({exc})",
            where=f"demo cohort {root}",
            fix="point at a folder written by histoclip.demo.synth.make_demo_cohort",
        ) from exc
    slides = sheet if split is None or "split" not in sheet.columns else sheet[sheet["split"] == split]
    if slides.empty:
        raise InputError(f"no slides in split {split!r}", where=f"{root / 'slides.tsv'}", fix="check the split name")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    n_classes = len(TISSUE_CLASSES)
    pools: dict[str, list[tuple[str, int, int]]] = {name: [] for name in TISSUE_CLASSES[1:]}
    for slide_id in slides["slide_id"]:
        label, downsample = read_class_map(root / "class_maps" / f"{slide_id}.png")
        side = -(-tile0 // downsample)  # tile side in class-map pixels
        h, w = label.shape
        if h < side or w < side:
            continue
        integral = np.zeros((n_classes, h + 1, w + 1), np.int32)
        for c in range(n_classes):
            integral[c, 1:, 1:] = np.cumsum(np.cumsum(label == c, axis=0, dtype=np.int32), axis=1)
        ys = rng.integers(0, h - side + 1, candidates_per_slide)
        xs = rng.integers(0, w - side + 1, candidates_per_slide)
        counts = integral[:, ys + side, xs + side] - integral[:, ys, xs + side] - integral[:, ys + side, xs]
        counts = counts + integral[:, ys, xs]
        best = counts.argmax(0)
        pure = (counts.max(0) >= min_purity * side * side) & (best != 0)
        for c, y, x in zip(best[pure].tolist(), ys[pure].tolist(), xs[pure].tolist(), strict=True):
            pools[TISSUE_CLASSES[c]].append((slide_id, x * downsample, y * downsample))

    rows: list[tuple[str, int, int, int, str, str, str]] = []
    if include_captions and (root / "captions.tsv").is_file():
        captions = pd.read_csv(root / "captions.tsv", sep="\t", dtype={"slide_id": str})
        captions = captions[captions["slide_id"].isin(set(slides["slide_id"]))]
        for name, group in captions.groupby("tissue_class", sort=True):
            group = group.iloc[:tiles_per_class]
            rows.extend(
                (r.slide_id, int(r.x), int(r.y), int(r.tile_level0_px), str(name), r.caption, "captions.tsv")
                for r in group.itertuples(index=False)
            )
    taken = {(r[0], r[1], r[2]) for r in rows}
    for name, pool in pools.items():
        have = sum(1 for r in rows if r[4] == name)
        fresh = list(dict.fromkeys(p for p in pool if p not in taken))
        need = max(0, tiles_per_class - have)
        if not fresh or not need:
            continue
        chosen = rng.choice(len(fresh), min(need, len(fresh)), replace=False)
        for i in sorted(chosen.tolist()):
            slide_id, x, y = fresh[i]
            caption = _caption(rng, CLASS_SYNONYMS[name], CAPTION_TEMPLATES)
            rows.append((slide_id, x, y, tile0, name, caption, "sampled"))
    frame = pd.DataFrame(rows, columns=["slide_id", "x", "y", "tile_level0_px", "tissue_class", "caption", "source"])
    frame = frame.sort_values(["slide_id", "y", "x", "source"], kind="stable").reset_index(drop=True)
    if out_path is not None:
        _write_pairs(out_path, frame)
    return frame


def image_folder_pairs(
    root: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    *,
    phrases: Mapping[str, Sequence[str]] | None = None,
    templates: Sequence[str] = CAPTION_TEMPLATES,
    captions_per_image: int = 1,
    seed: int = 0,
) -> pd.DataFrame:
    """Image-file pairs from a folder-per-class tree (``root/{class}/*.jpg``, as in ImageFolder).

    Each image gets ``captions_per_image`` captions, each a random template × phrase of its folder
    (``phrases[folder]``, e.g. several wordings of "lung adenocarcinoma"; default: the folder name itself).
    Columns ``image, caption, label`` (label = folder name). ``image`` is relative to ``out_path``'s folder
    when the table is written there, else absolute. Deterministic for a seed.
    """
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    rng = np.random.default_rng(np.random.SeedSequence([seed, 13]))
    base = Path(out_path).resolve().parent if out_path is not None else None
    rows = []
    for folder in folders:
        words = list((phrases or {}).get(folder.name, (folder.name,)))
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            shown = os.path.relpath(image.resolve(), base) if base is not None else str(image.resolve())
            rows.extend((shown, _caption(rng, words, templates), folder.name) for _ in range(captions_per_image))
    if not rows:
        raise InputError(
            "no class folders with images",
            where=f"image folder {root}",
            fix=f"lay images out as {root}/CLASS/IMAGE ({', '.join(IMAGE_SUFFIXES)})",
        )
    frame = pd.DataFrame(rows, columns=["image", "caption", "label"])
    if out_path is not None:
        _write_pairs(out_path, frame)
    return frame
