"""One slide's tile-level results, aligned row by row: what every per-slide export reads.

The tile file, the embedding file, each prompt set's tile scores and the phenotype assignments all list the
slide's tiles in the same order (each stage writes its rows in the order of the one before). An export that
joined them blindly would pair a tile with another tile's score if one file were stale, so they are checked
here: same tiles, same order, or an error naming the file to re-make.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoclip import formats
from histoclip.errors import InputError

__all__ = ["ModelResults", "SlideTiles", "model_provenance", "read_slide_tiles", "same_tiles", "write_index"]


@dataclass(frozen=True)
class SlideTiles:
    """One slide's tiles (level-0 top-left corners, tissue fraction) and what the stages found for each."""

    slide_id: str
    x: np.ndarray
    y: np.ndarray
    tissue: np.ndarray
    #: the tile file's footer: how the slide was tiled (tile_level0_px, level0 size, mpp, status …)
    tile_meta: dict[str, Any]
    #: the embedding file's footer: the model's provenance (model, weights_sha256, dim …); {} when not read
    embedding_meta: dict[str, Any] = field(default_factory=dict)
    #: {prompt set: {class: zero-shot score of every tile}}, classes in the tile-score file's order
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    #: phenotype number of every tile (None: no phenotypes read)
    phenotype: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.x.size)

    @property
    def status(self) -> str:
        return str(self.tile_meta.get("status", "ok"))

    @property
    def tile_level0_px(self) -> int:
        return int(self.tile_meta["tile_level0_px"])


def same_tiles(
    slide_id: str, x: np.ndarray, y: np.ndarray, other_x: np.ndarray, other_y: np.ndarray, path: str | Path
) -> None:
    """Raise unless ``path``'s rows are the tile file's tiles in the tile file's order."""
    if len(other_x) == len(x) and np.array_equal(other_x, x) and np.array_equal(other_y, y):
        return
    raise InputError(
        f"slide {slide_id}: lists {len(other_x)} tiles that are not the tile file's {len(x)} tiles in its order "
        "(the file is older than the slide's tiling)",
        where=str(path),
        fix="re-run the workflow: Snakemake re-makes the stale file (or delete it to force it)",
    )


def read_slide_tiles(
    slide_id: str,
    tile_file: str | Path,
    *,
    embedding_file: str | Path | None = None,
    score_files: Mapping[str, str | Path] | None = None,
    assignment_file: str | Path | None = None,
) -> SlideTiles:
    """Read one slide's tile file and, as given, its embedding footer, tile scores per prompt set and phenotype
    assignments, each checked to list the same tiles in the same order."""
    x, y, tissue, meta = formats.read_tile_table(tile_file)
    embedding_meta: dict[str, Any] = {}
    if embedding_file is not None:
        footer = formats.read_embedding_footer(embedding_file)
        if footer.n_rows != len(x):
            raise InputError(
                f"slide {slide_id}: {footer.n_rows} embeddings for {len(x)} tiles",
                where=str(embedding_file),
                fix="re-run the embedding step for this slide (delete the file to force it)",
            )
        embedding_meta = footer.metadata
    scores: dict[str, dict[str, np.ndarray]] = {}
    for prompt_set, path in (score_files or {}).items():
        sx, sy, by_class = formats.read_tile_scores(path)
        same_tiles(slide_id, x, y, sx, sy, path)
        scores[prompt_set] = by_class
    phenotype = None
    if assignment_file is not None:
        ax, ay, phenotype, _ = formats.read_phenotype_assignments(assignment_file)
        same_tiles(slide_id, x, y, ax, ay, assignment_file)
    return SlideTiles(slide_id, x, y, tissue, meta, embedding_meta, scores, phenotype)


@dataclass(frozen=True)
class ModelResults:
    """Where one model's stage outputs are, as the export rules give them: per prompt set its tile-score folder
    and calls table (in config order: the first decides the QuPath classes, as it colours the slide map), and the
    phenotype folder (``results/phenotypes/{model}``; None: no phenotypes)."""

    model: str
    tile_score_dirs: dict[str, Path] = field(default_factory=dict)
    calls: dict[str, Path] = field(default_factory=dict)
    phenotype_dir: Path | None = None

    @classmethod
    def of(
        cls,
        model: str,
        tile_score_dirs: Mapping[str, str | Path] | None = None,
        calls: Mapping[str, str | Path] | None = None,
        phenotype_dir: str | Path | None = None,
    ) -> ModelResults:
        return cls(
            model,
            {k: Path(v) for k, v in (tile_score_dirs or {}).items()},
            {k: Path(v) for k, v in (calls or {}).items()},
            Path(phenotype_dir) if phenotype_dir is not None else None,
        )

    @classmethod
    def of_job(cls, params: Any, inputs: Any) -> ModelResults:
        """What an export shard rule hands its script: ``params.model`` and ``params.prompt_sets``; the inputs
        ``tile_scores`` and ``calls`` (one per prompt set, in that order) and ``phenotypes`` (a file of the model's
        phenotype folder)."""
        return cls.of(
            params.model,
            dict(zip(params.prompt_sets, inputs.tile_scores, strict=True)),
            dict(zip(params.prompt_sets, inputs.calls, strict=True)),
            Path(inputs.phenotypes).parent,
        )

    @property
    def first_prompt_set(self) -> str | None:
        return next(iter(self.tile_score_dirs), None)

    def score_files(self, slide_id: str) -> dict[str, Path]:
        return {name: folder / f"{slide_id}.parquet" for name, folder in self.tile_score_dirs.items()}

    def assignment_file(self, slide_id: str) -> Path | None:
        return None if self.phenotype_dir is None else self.phenotype_dir / "assignments" / f"{slide_id}.parquet"

    def phenotype_table(self) -> Any:
        """``phenotypes.tsv`` (None without phenotypes)."""
        return (
            None if self.phenotype_dir is None else formats.read_phenotype_table(self.phenotype_dir / "phenotypes.tsv")
        )

    def phenotype_names(self) -> list[str] | None:
        """Each phenotype's name by number: ``phenotype_03`` or, when a prompt set named it, ``phenotype_03
        (stroma)``."""
        table = self.phenotype_table()
        if table is None:
            return None
        return [f"{p} ({c})" if c else str(p) for p, c in zip(table["phenotype"], table["nearest_class"], strict=True)]

    def read_slide(self, slide_id: str, tile_file: str | Path, embedding_file: str | Path | None) -> SlideTiles:
        return read_slide_tiles(
            slide_id,
            tile_file,
            embedding_file=embedding_file,
            score_files=self.score_files(slide_id),
            assignment_file=self.assignment_file(slide_id),
        )


def model_provenance(model: str, embedding_meta: Mapping[str, Any]) -> dict[str, Any]:
    """What an export says about the model that made its features (``model``: its name in the config;
    ``model_spec``, ``weights_sha256`` …: from an embedding file's or the slide table's footer) and the package
    versions that wrote it."""

    keys = ("backend", "architecture", "weights_sha256", "dim", "embedding_dtype")
    return {
        "model": model,
        **({"model_spec": embedding_meta["model"]} if "model" in embedding_meta else {}),
        **{key: embedding_meta[key] for key in keys if key in embedding_meta},
        "versions": export_versions(),
    }


#: Packages that write the export files, recorded beside :data:`histoclip.store.PROVENANCE_PACKAGES`.
EXPORT_PACKAGES = ("anndata", "h5py", "shapely", "contourpy")


def export_versions() -> dict[str, str]:
    """The versions every output records, plus those of the packages that write the exports."""
    from importlib import metadata

    from histoclip import store

    versions = store.package_versions()
    for name in EXPORT_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def write_index(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """A shard's index of the files it wrote (slide_id, path, n_tiles, status): what the default target asks for,
    so planning a large cohort resolves one file per shard instead of one per slide."""
    import pandas as pd

    from histoclip import store

    store.write_tsv(pd.DataFrame(rows, columns=["slide_id", "path", "n_tiles", "status"]), path)
