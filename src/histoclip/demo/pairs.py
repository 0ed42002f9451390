"""Tile–caption pairs for training the demo CLIP on the demo cohort (the rule ``demo_training_pairs``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histoclip.demo.captions import CAPTION_MIN_PURITY, CLASS_SYNONYMS
from histoclip.demo.classes import TISSUE_CLASSES, read_class_map
from histoclip.errors import InputError
from histoclip.sheets import read_table
from histoclip.training.captions import CAPTION_TEMPLATES, draw_caption
from histoclip.training.pairs import write_pairs

PAIR_COLUMNS = ["slide_id", "x", "y", "tile_level0_px", "tissue_class", "caption", "source"]


def _caption_tile_px(root: Path) -> int:
    """The caption tiles' side in level-0 px (``caption_tile_um`` / ``mpp`` of ``cohort.json``)."""
    try:
        description = json.loads((root / "cohort.json").read_text())
        return int(round(float(description["caption_tile_um"]) / float(description["mpp"])))
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(
            f"cannot read the tile size from {root / 'cohort.json'} ({exc})",
            where=f"demo cohort {root}",
            fix="point at a folder written by histoclip.demo.cohort.make_demo_cohort",
        ) from exc


def _class_pools(
    rng: np.random.Generator,
    root: Path,
    slide_ids: Sequence[str],
    tile0: int,
    candidates_per_slide: int,
    min_purity: float,
) -> dict[str, list[tuple[str, int, int]]]:
    """Per tissue class, the (slide, x, y) of random candidate tiles that are at least ``min_purity`` that class."""
    n_classes = len(TISSUE_CLASSES)
    pools: dict[str, list[tuple[str, int, int]]] = {name: [] for name in TISSUE_CLASSES[1:]}
    for slide_id in slide_ids:
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
    return pools


def _cohort_caption_rows(
    root: Path, slide_ids: Sequence[str], tiles_per_class: int
) -> list[tuple[str, int, int, int, str, str, str]]:
    """The cohort's own ``captions.tsv`` rows of these slides, the first ``tiles_per_class`` of each class."""
    rows: list[tuple[str, int, int, int, str, str, str]] = []
    captions = pd.read_csv(root / "captions.tsv", sep="\t", dtype={"slide_id": str})
    captions = captions[captions["slide_id"].isin(set(slide_ids))]
    for name, group in captions.groupby("tissue_class", sort=True):
        group = group.iloc[:tiles_per_class]
        rows.extend(
            (r.slide_id, int(r.x), int(r.y), int(r.tile_level0_px), str(name), r.caption, "captions.tsv")
            for r in group.itertuples(index=False)
        )
    return rows


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
    """Tile–caption pairs for training the demo CLIP on a cohort from :func:`histoclip.demo.cohort.make_demo_cohort`.

    The cohort's ``captions.tsv`` has a few hundred pairs on a fixed grid, with the rare classes (fat,
    lymphocytes) down to a dozen or two in the train split: too few for a CLIP. This adds tiles at random
    level-0 offsets on the ``split`` slides whose area is at least ``min_purity`` one tissue class (from the
    class maps; background excluded), with captions drawn like the cohort's (a template × a synonym of the
    class, :data:`~histoclip.training.captions.CAPTION_TEMPLATES` ×
    :data:`~histoclip.demo.captions.CLASS_SYNONYMS`), and caps
    every class at ``tiles_per_class`` pairs so that rare classes are not drowned out (the cohort's own
    captions are kept first). Tiles have the caption tiles' physical size (``caption_tile_um`` in
    ``cohort.json``).

    Columns: ``slide_id, x, y, tile_level0_px, tissue_class, caption, source`` (``captions.tsv`` or
    ``sampled``), sorted by slide and position; deterministic for a seed. Written as TSV (atomically) to
    ``out_path`` when given; read it back with ``read_pairs(out_path, sheet_path=cohort_root/"slides.tsv")``
    (:func:`histoclip.training.pairs.read_pairs`).
    """
    root = Path(cohort_root)
    sheet = read_table(root / "slides.tsv", kind="cohort sheet", required=("slide_id", "path"))
    tile0 = _caption_tile_px(root)
    slides = sheet if split is None or "split" not in sheet.columns else sheet[sheet["split"] == split]
    if slides.empty:
        raise InputError(f"no slides in split {split!r}", where=f"{root / 'slides.tsv'}", fix="check the split name")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    pools = _class_pools(rng, root, slides["slide_id"].tolist(), tile0, candidates_per_slide, min_purity)

    rows: list[tuple[str, int, int, int, str, str, str]] = []
    if include_captions and (root / "captions.tsv").is_file():
        rows = _cohort_caption_rows(root, slides["slide_id"].tolist(), tiles_per_class)
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
            caption = draw_caption(rng, CLASS_SYNONYMS[name], CAPTION_TEMPLATES)
            rows.append((slide_id, x, y, tile0, name, caption, "sampled"))
    frame = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    frame = frame.sort_values(["slide_id", "y", "x", "source"], kind="stable").reset_index(drop=True)
    if out_path is not None:
        write_pairs(out_path, frame)
    return frame
