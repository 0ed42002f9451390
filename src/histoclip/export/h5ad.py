"""AnnData exports for scanpy and squidpy users.

``results/export/{model}/slides.h5ad``: one observation per slide of the sheet, in sheet order.

* ``X``: the slide embeddings (``results/slides/{model}.parquet``: mean of the tile embeddings, renormalised),
  float32; NaN rows for slides without tiles;
* ``obs``: the sheet's columns (``patient_id``, ``path``, ``mpp``, ``label``, ``split`` and any other; columns
  whose every value is a number become numbers), ``n_tiles``, each prompt set's calls (``{set}_call``,
  ``{set}_best``, ``{set}_margin``, ``{set}_abstain``, ``{set}_status`` and ``{set}_p_{class}``), the slide
  ``cluster`` and its ``silhouette``, the phenotype composition (``phenotype_00`` …: fractions of the slide's tiles)
  and the class fractions (``fraction_{class}``: phenotypes summed by their nearest class);
* ``obsm["X_pca"]`` (or ``X_tsne``): the 2-D slide map exactly as the slide-map figure draws it (clustering's
  ``map_1``, ``map_2``), with ``uns["slide_map"]`` saying its method, axes and the features it was made from;
* ``uns["histoclip"]``: the model's provenance and the versions that wrote the file.

``results/export/{model}/tiles/{slide}.h5ad`` (on request: ``export.tile_anndata``): one observation per tile.

* ``X``: the tile embeddings, float32; ``obs``: ``x``, ``y`` (level-0 top-left corner), ``tissue`` (fraction),
  ``{set}_score_{class}`` per prompt set and class, ``phenotype`` (its name, a category) and ``phenotype_id``;
* ``obsm["spatial"]``: (x, y) in level-0 pixels, what squidpy's spatial functions read;
* ``uns["histoclip"]``: slide id, tile size in level-0 pixels, mpp and provenance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histoclip import formats, store
from histoclip.errors import InputError
from histoclip.export.tiles import ModelResults, model_provenance, same_tiles, write_index
from histoclip.sheets import read_cohort_sheet

if TYPE_CHECKING:
    import anndata

__all__ = [
    "export_tile_anndata_shard",
    "sheet_frame",
    "slides_anndata",
    "tile_anndata",
    "write_h5ad",
]


def _numbers_where_possible(column: pd.Series) -> pd.Series:
    """A sheet column as numbers when every non-empty value is one (age, stage …), else as text."""
    filled = column.replace("", np.nan)
    numbers = pd.to_numeric(filled, errors="coerce")
    if filled.notna().any() and numbers.notna().sum() == filled.notna().sum():
        return numbers
    return column


def sheet_frame(sheet: str | Path) -> pd.DataFrame:
    """The cohort sheet as a frame indexed by slide id: ``patient_id``, ``path`` (absolute), ``mpp``, ``label`` and
    every other column of the sheet."""
    records = read_cohort_sheet(sheet, check_files=False)
    extra = list(dict.fromkeys(key for r in records for key in r.extra))
    frame = pd.DataFrame(
        {
            "patient_id": [r.patient_id for r in records],
            "path": [str(r.path) for r in records],
            "mpp": [np.nan if r.mpp is None else r.mpp for r in records],
            "label": [r.label or "" for r in records],
            **{key: [r.extra.get(key, "") for r in records] for key in extra},
        },
        index=pd.Index([r.slide_id for r in records], name="slide_id"),
    )
    for key in extra:
        frame[key] = _numbers_where_possible(frame[key])
    return frame


def _calls_columns(prompt_set: str, calls_path: str | Path) -> pd.DataFrame:
    calls = formats.read_calls(calls_path).set_index("slide_id")
    keep = ["call", "best", "margin", "abstain", "status"]
    keep += [c for c in calls.columns if c.startswith(formats.PROBABILITY_PREFIX)]
    return calls[[c for c in keep if c in calls.columns]].add_prefix(f"{prompt_set}_")


def _categorical_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Text columns as categories ("" as missing): what AnnData stores them as, and what scanpy colours by."""
    for column in frame.columns:
        if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column]):
            frame[column] = pd.Categorical(frame[column].replace("", np.nan))
    return frame


def _uns_safe(value: Any) -> Any:
    """A value AnnData can write into ``uns``: no None (written as ""), tuples as lists, nested dicts kept."""
    if isinstance(value, Mapping):
        return {str(k): _uns_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_uns_safe(v) for v in value] if value else []
    if value is None:
        return ""
    return value


def slides_anndata(
    sheet: str | Path,
    slide_table: str | Path,
    results: ModelResults,
    *,
    clusters: str | Path | None = None,
    clustering_summary: str | Path | None = None,
) -> anndata.AnnData:
    """The cohort's slides as AnnData (module docstring). ``slide_table``: ``results/slides/{model}.parquet``;
    ``clusters`` / ``clustering_summary``: ``slide_clusters.tsv`` / ``clustering.json`` of the model."""
    import anndata

    obs = sheet_frame(sheet)
    frame, embeddings = formats.read_slide_embeddings(slide_table)
    ids = frame["slide_id"].astype(str).tolist()
    if ids != obs.index.tolist():
        raise formats_error(slide_table, "does not list the sheet's slides in the sheet's order")
    obs["n_tiles"] = frame["n_tiles"].to_numpy(np.int64)
    for prompt_set, path in results.calls.items():
        obs = obs.join(_calls_columns(prompt_set, path))
    uns: dict[str, Any] = {}
    obsm: dict[str, np.ndarray] = {}
    if clusters is not None:
        table = pd.read_csv(clusters, sep="\t", dtype={"slide_id": str, "cluster": "Int64"}).set_index("slide_id")
        obs["cluster"] = pd.Categorical([None if pd.isna(c) else str(c) for c in table["cluster"].reindex(obs.index)])
        obs["silhouette"] = table["silhouette"].reindex(obs.index).to_numpy(np.float64)
        summary = json.loads(Path(clustering_summary).read_text(encoding="utf-8")) if clustering_summary else {}
        method = summary.get("map", {}).get("method", "pca")
        obsm[f"X_{method}"] = table[["map_1", "map_2"]].reindex(obs.index).to_numpy(np.float64)
        uns["slide_map"] = {
            "method": method,
            "obsm_key": f"X_{method}",
            "axes": list(summary.get("map", {}).get("axes", ["map 1", "map 2"])),
            "features": summary.get("features", ""),
            "k": int(summary.get("k", 0)),
        }
    if results.phenotype_dir is not None:
        composition = formats.read_composition(results.phenotype_dir / "composition.tsv").set_index("slide_id")
        columns = [c for c in composition.columns if c.startswith(formats.PHENOTYPE_PREFIX)]
        obs = obs.join(composition[columns])
        by_class = pd.read_csv(results.phenotype_dir / "class_composition.tsv", sep="\t", dtype={"slide_id": str})
        class_columns = [c for c in by_class.columns if c not in ("slide_id", "patient_id", "n_tiles")]
        obs = obs.join(by_class.set_index("slide_id")[class_columns].add_prefix("fraction_"))
        names = results.phenotype_names()
        if names:
            uns["phenotypes"] = names
    dim = embeddings.shape[1]
    footer = store.read_metadata(slide_table)  # the aggregation copies the embeddings' model provenance
    uns["histoclip"] = _uns_safe(
        {
            **model_provenance(results.model, footer),
            "X": "slide embeddings (mean of the tile embeddings, renormalised); NaN rows: slides without tiles",
            "prompt_sets": list(results.calls),
        }
    )
    return anndata.AnnData(
        X=embeddings.astype(np.float32),
        obs=_categorical_text(obs),
        var=pd.DataFrame(index=pd.Index([f"dim_{i}" for i in range(dim)], name="dimension")),
        obsm=obsm,
        uns=uns,
    )


def formats_error(path: str | Path, problem: str) -> Exception:
    return InputError(problem, where=str(path), fix="re-run the workflow: Snakemake re-makes the stale file")


def tile_anndata(
    slide_id: str, tile_file: str | Path, embedding_file: str | Path, results: ModelResults
) -> anndata.AnnData:
    """One slide's tiles as AnnData (module docstring)."""
    import anndata

    tiles = results.read_slide(slide_id, tile_file, embedding_file)
    ex, ey, embeddings, embedding_meta = formats.read_tile_embeddings(embedding_file)
    same_tiles(slide_id, tiles.x, tiles.y, ex, ey, embedding_file)
    obs = pd.DataFrame(
        {"x": tiles.x.astype(np.int64), "y": tiles.y.astype(np.int64), "tissue": tiles.tissue.astype(np.float32)},
        index=pd.Index([f"{x}_{y}" for x, y in zip(tiles.x.tolist(), tiles.y.tolist(), strict=True)], name="tile"),
    )
    for prompt_set, by_class in tiles.scores.items():
        for cls, values in by_class.items():
            obs[f"{prompt_set}_score_{cls}"] = values.astype(np.float32)
    names = results.phenotype_names()
    if tiles.phenotype is not None:
        obs["phenotype_id"] = tiles.phenotype.astype(np.int64)
        labels = [names[p] if names else str(p) for p in tiles.phenotype.tolist()]
        obs["phenotype"] = pd.Categorical(labels, categories=names if names else None)
    uns = {
        "histoclip": _uns_safe(
            {
                "slide_id": slide_id,
                "status": tiles.status,
                "coordinates": "x, y and obsm['spatial']: level-0 pixels of the tile's top-left corner",
                "tile_level0_px": tiles.tile_meta.get("tile_level0_px"),
                "level0_mpp": tiles.tile_meta.get("level0_mpp"),
                "target_mpp": tiles.tile_meta.get("target_mpp"),
                "prompt_sets": list(tiles.scores),
                **model_provenance(results.model, embedding_meta),
            }
        )
    }
    dim = embeddings.shape[1]
    return anndata.AnnData(
        X=embeddings.astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index([f"dim_{i}" for i in range(dim)], name="dimension")),
        obsm={"spatial": np.column_stack([tiles.x, tiles.y]).astype(np.int64).reshape(-1, 2)},
        uns=uns,
    )


def write_h5ad(adata: anndata.AnnData, path: str | Path) -> None:
    """Write an AnnData file atomically (temporary file + rename, like every output of the workflow)."""
    with store.atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def export_tile_anndata_shard(
    slide_ids: Sequence[str],
    tile_files: Sequence[str | Path],
    embedding_files: Sequence[str | Path],
    results: ModelResults,
    outputs: Sequence[str | Path],
    index: str | Path,
) -> list[dict[str, Any]]:
    """Every slide of a shard as tile AnnData (:func:`tile_anndata`), then the shard's index."""
    rows = []
    for slide_id, tiles, embeddings, out in zip(slide_ids, tile_files, embedding_files, outputs, strict=True):
        adata = tile_anndata(slide_id, tiles, embeddings, results)
        write_h5ad(adata, out)
        rows.append(
            {"slide_id": slide_id, "path": str(out), "n_tiles": adata.n_obs, "status": adata.uns["histoclip"]["status"]}
        )
    write_index(index, rows)
    return rows
