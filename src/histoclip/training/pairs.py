"""Pair tables: captions and what each one describes (a tile of a slide, an image file, or a whole slide).

A table is TSV (or CSV by extension) with a ``caption`` column; the other columns say what the image is
(:func:`read_pairs` tells the kinds apart by their columns):

- **tile pairs** — ``slide_id, x, y, tile_level0_px`` (level-0 top-left corner and side of the tile,
  optional ``read_level``/``read_tile_px``): pixels read with OpenSlide from the slide the cohort sheet names;
- **image-file pairs** — ``image``: a path, relative to the table's folder (or absolute);
- **slide-level pairs** — ``slide_id`` only (a caption per slide, e.g. a report line): each step draws
  ``bag_size`` tiles of the slide from its tile file (``{tiles_dir}/{slide_id}.parquet``, written by the tile
  rule) and the caption is paired with the mean of their embeddings.

An optional ``label`` (or ``tissue_class``) column is kept for the held-in zero-shot check. Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip import store
from histoclip.errors import InputError
from histoclip.sheets import read_cohort_sheet, read_table
from histoclip.training.captions import CAPTION_TEMPLATES, draw_caption

PAIR_KINDS = ("tile", "image", "slide")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_MAX_LISTED_PROBLEMS = 20


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
        fix="read the table with histoclip.training.pairs.read_pairs",
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


def _table_kind(table: pd.DataFrame, path: Path) -> str:
    """The kind of pairs a table holds, told by its columns (see the module docstring)."""
    columns = set(table.columns)
    if "image" in columns:
        return "image"
    if "slide_id" in columns and columns & {"x", "y", "tile_level0_px"}:
        missing = [c for c in ("x", "y", "tile_level0_px") if c not in columns]
        if missing:
            raise InputError(
                f"tile pairs need the columns slide_id, x, y, tile_level0_px; missing {missing}",
                where=f"pair table {path}",
                fix="add them: level-0 pixel coordinates of each tile's top-left corner and its side in level-0 px",
            )
        return "tile"
    if "slide_id" in columns:
        return "slide"
    raise InputError(
        f"cannot tell which images the captions belong to; found columns {list(table.columns)}",
        where=f"pair table {path}",
        fix="add an 'image' column (image files), or 'slide_id' (+ 'x', 'y', 'tile_level0_px' for tiles)",
    )


def _image_columns(
    table: pd.DataFrame, path: Path, lines: list[int], split: str | None, problems: list[str], attrs: dict[str, Any]
) -> tuple[dict[str, list[Any]], np.ndarray]:
    """Image-file pairs: absolute image paths, and which rows are in ``split`` (the table's own ``split``
    column, if any). Raises every problem found so far (``problems``) with those of the images."""
    base = path.resolve().parent
    keep = np.ones(len(table), bool)
    if split is not None and "split" in table.columns:
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
    return {"image": images}, keep


def _tile_columns(table: pd.DataFrame, path: Path, lines: list[int], problems: list[str]) -> dict[str, list[Any]]:
    """Tile pairs' coordinates (level-0 px) and optional read geometry (-1: not given), checked cell by cell."""
    columns: dict[str, list[Any]] = {}
    for column, minimum in (("x", 0), ("y", 0), ("tile_level0_px", 1)):
        columns[column] = [
            _int_cell(v, f"{path}, line {line}", column, problems, minimum=minimum)
            for line, v in zip(lines, table[column].tolist(), strict=True)
        ]
    for column, minimum in (("read_level", 0), ("read_tile_px", 1)):
        values = table[column].tolist() if column in table.columns else [""] * len(table)
        columns[column] = [
            _int_cell(v, f"{path}, line {line}", column, problems, minimum=minimum) if v else -1
            for line, v in zip(lines, values, strict=True)
        ]
    return columns


def _slide_columns(
    table: pd.DataFrame,
    path: Path,
    kind: str,
    lines: list[int],
    sheet_path: str | os.PathLike[str] | None,
    split: str | None,
    tiles_dir: str | os.PathLike[str] | None,
    problems: list[str],
    attrs: dict[str, Any],
) -> tuple[dict[str, list[Any]], np.ndarray]:
    """Tile and slide-level pairs: each slide looked up in the cohort sheet, which rows are in ``split`` (the
    sheet's ``split`` column, if any), tile coordinates or tile files. Raises every problem found so far
    (``problems``) with those of the slides."""
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
        rows.update(_tile_columns(table, path, lines, problems))
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
    return rows, keep


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
    kind = _table_kind(table, path)
    problems: list[str] = []
    lines = [int(i) + 2 for i in table.index]  # the header is line 1
    captions = table["caption"].tolist()
    labels = _label_column(table)
    for line, caption in zip(lines, captions, strict=True):
        if not caption:
            problems.append(f"{path}, line {line}, column 'caption': empty caption")

    attrs: dict[str, Any] = {"kind": kind, "table": str(path.resolve()), "rows_in_table": len(table), "split": split}
    if kind == "image":
        columns, keep = _image_columns(table, path, lines, split, problems, attrs)
    else:
        columns, keep = _slide_columns(table, path, kind, lines, sheet_path, split, tiles_dir, problems, attrs)
    out = pd.DataFrame({**columns, "caption": captions, "label": labels, "line": lines})[keep]
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


def slide_pairs_with_tiles(pairs: pd.DataFrame, tiles_dir: str | os.PathLike[str] | None) -> pd.DataFrame:
    """Slide-level pairs with each slide's tile file (``tiles_path``), checked to exist; when training."""
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


def write_pairs(path: str | os.PathLike[str], frame: pd.DataFrame) -> None:
    """Write a pair table as TSV, atomically."""
    with store.atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, lineterminator="\n")


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
            rows.extend((shown, draw_caption(rng, words, templates), folder.name) for _ in range(captions_per_image))
    if not rows:
        raise InputError(
            "no class folders with images",
            where=f"image folder {root}",
            fix=f"lay images out as {root}/CLASS/IMAGE ({', '.join(IMAGE_SUFFIXES)})",
        )
    frame = pd.DataFrame(rows, columns=["image", "caption", "label"])
    if out_path is not None:
        write_pairs(out_path, frame)
    return frame
