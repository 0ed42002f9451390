"""Per-slide HDF5 features in the layout CLAM and TRIDENT read (``results/export/{model}/h5/{slide}.h5``).

Groups that train MIL models in CLAM, TRIDENT or STAMP keep one HDF5 file per slide with two datasets, as CLAM's
``extract_features_fp.py`` and TRIDENT's ``WSI.extract_features`` write them and their loaders read them
(``dataset_generic.py``: ``f['features'][:]``, ``f['coords'][:]``):

* ``features``: N × D float32, one row per tile (histoclip's embeddings, L2-normalised, in the model's space);
* ``coords``: N × 2 int64, each tile's level-0 top-left corner (x, y), in the same order.

The attributes of ``coords`` say how to cut the tile out of the slide again, in the two tools' words, describing
the same level-0 square (``patch_size_level0`` pixels wide):

* CLAM (``Whole_Slide_Bag_FP``): ``wsi.read_region(coord, patch_level, (patch_size, patch_size))``, so
  ``patch_level`` is the pyramid level histoclip reads the tile from and ``patch_size`` its side there
  (``read_tile_px``); ``downsample`` is that level's downsample, as CLAM writes it;
* TRIDENT (``read_coords`` → ``create_patcher``): ``patch_size`` pixels at ``target_magnification`` cover
  ``patch_size × level0_magnification / target_magnification`` level-0 pixels, so the magnifications are those of
  level 0 and of the read level (TRIDENT's convention: magnification = 10 / mpp), and ``patch_size_level0``,
  ``level0_width``, ``level0_height``, ``overlap``, ``name`` are written as TRIDENT writes them.

Why the read level and not histoclip's target resolution: CLAM has no other way to say "resize after reading",
and with one ``patch_size`` for both tools this is the choice that both cut out exactly histoclip's tile. When the
slide has a level at ``tiling.target_mpp`` (a 20x slide at 0.5 µm/px) both are the same; otherwise (a 40x slide
without a 20x level) ``patch_size`` is the larger side read at level 0 and ``target_magnification`` is 40 — the
features were still made from the tile resized to ``tile_px`` at ``target_mpp``, which the attributes
``target_mpp`` and ``tile_px`` say. The ``features`` attributes name the encoder and its weights' sha256, and
``histoclip.provenance`` the versions that wrote the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histoclip import formats, store
from histoclip.export.tiles import model_provenance, same_tiles, write_index

__all__ = ["coords_attributes", "export_h5_shard", "export_slide_h5", "write_mil_h5"]

#: TRIDENT's and histoclip's convention: magnification = 10 µm / mpp (0.25 µm/px = 40x).
MAGNIFICATION_MICRONS = 10.0


def coords_attributes(tile_meta: Mapping[str, Any], slide_id: str, save_dir: str) -> dict[str, Any]:
    """The ``coords`` attributes of a slide tiled as ``tile_meta`` (a tile file's footer) says (module docstring)."""
    if tile_meta.get("status", "ok") != "ok":
        return {"name": slide_id, "savetodir": save_dir, "status": str(tile_meta.get("status"))}
    read_tile_px = int(tile_meta["read_tile_px"])
    tile_px = int(tile_meta["tile_px"])
    downsample = float(tile_meta["level_downsamples"][int(tile_meta["read_level"])])
    return {
        # CLAM
        "patch_level": int(tile_meta["read_level"]),
        "patch_size": read_tile_px,
        "downsample": np.array([downsample, downsample]),
        # TRIDENT
        "patch_size_level0": int(tile_meta["tile_level0_px"]),
        "level0_magnification": MAGNIFICATION_MICRONS / float(tile_meta["level0_mpp"]),
        "target_magnification": MAGNIFICATION_MICRONS / float(tile_meta["read_level_mpp"]),
        "overlap": round(int(tile_meta.get("overlap_px", 0)) * read_tile_px / tile_px),
        "name": slide_id,
        "savetodir": save_dir,
        "level0_width": int(tile_meta["level0_width"]),
        "level0_height": int(tile_meta["level0_height"]),
        # histoclip's own words for the same tile
        "level0_mpp": float(tile_meta["level0_mpp"]),
        "mpp_source": str(tile_meta.get("mpp_source", "")),
        "target_mpp": float(tile_meta["target_mpp"]),
        "tile_px": tile_px,
        "stride_level0_px": int(tile_meta.get("stride_level0_px", tile_meta["tile_level0_px"])),
    }


def _h5_value(value: Any) -> Any:
    """An attribute value h5py can store: dicts and lists as JSON (as TRIDENT's save_h5 does), None as 'None'."""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    if value is None:
        return "None"
    return value


def write_mil_h5(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    coords_attrs: Mapping[str, Any],
    features_attrs: Mapping[str, Any],
) -> None:
    """``features`` (float32) and ``coords`` (int64), with their attributes, atomically."""
    import h5py

    features = np.asarray(features, np.float32)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if len(features) != len(coords):
        raise ValueError(f"{path}: {len(features)} feature rows for {len(coords)} coordinates")
    with store.atomic_path(path) as tmp, h5py.File(tmp, "w") as file:
        for name, data, attrs in (("features", features, features_attrs), ("coords", coords, coords_attrs)):
            dataset = file.create_dataset(name, data=data)
            for key, value in attrs.items():
                dataset.attrs[key] = _h5_value(value)


def export_slide_h5(
    slide_id: str, tile_file: str | Path, embedding_file: str | Path, out: str | Path, model: str
) -> dict[str, Any]:
    """One slide's embeddings and tile corners as CLAM/TRIDENT HDF5; returns its index row. A slide without tiles
    (failed, or no tissue) gets ``features`` of shape (0, D) and ``coords`` (0, 2), as TRIDENT writes one."""
    x, y, tissue, tile_meta = formats.read_tile_table(tile_file)
    ex, ey, embeddings, embedding_meta = formats.read_tile_embeddings(embedding_file)
    same_tiles(slide_id, x, y, ex, ey, embedding_file)
    provenance = model_provenance(model, embedding_meta)
    features_attrs = {
        "name": slide_id,
        "savetodir": str(Path(out).parent),
        "encoder": model,
        **{key: provenance[key] for key in ("model", "backend", "weights_sha256", "dim") if key in provenance},
        store.PROVENANCE_KEY: {"versions": provenance["versions"]},
    }
    coords = np.column_stack([x, y]) if len(x) else np.zeros((0, 2), np.int64)
    write_mil_h5(out, embeddings, coords, coords_attributes(tile_meta, slide_id, str(Path(out).parent)), features_attrs)
    return {"slide_id": slide_id, "path": str(out), "n_tiles": len(x), "status": tile_meta.get("status", "ok")}


def export_h5_shard(
    slide_ids: Sequence[str],
    tile_files: Sequence[str | Path],
    embedding_files: Sequence[str | Path],
    outputs: Sequence[str | Path],
    index: str | Path,
    model: str,
) -> list[dict[str, Any]]:
    """Every slide of a shard (:func:`export_slide_h5`), then the shard's index."""
    rows = [
        export_slide_h5(slide_id, tiles, embeddings, out, model)
        for slide_id, tiles, embeddings, out in zip(slide_ids, tile_files, embedding_files, outputs, strict=True)
    ]
    write_index(index, rows)
    return rows
