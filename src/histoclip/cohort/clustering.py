"""Slide clustering: k-means on slide features, k by silhouette, stability by bootstrap, a 2-D map.

Why: unsupervised groups of slides are how a cohort study looks for subtypes the labels don't know about, and
a clustering is only worth reporting with (a) how k was chosen and (b) how stable the groups are. So the
silhouette of every k tried is written down, and the clustering is refit on bootstrap resamples of the slides
and compared with the full clustering (adjusted Rand index on the slides each resample shares with the
cohort): a median near 1 means the groups are real structure; near 0 means k-means is cutting noise.

Features (config ``clustering.slide_features``):

* ``embedding``: the slide embedding, mean of the tile embeddings renormalised (``results/slides/{model}.parquet``
  from the aggregation stage, or computed here from the tile embeddings, one slide at a time). On unit vectors
  Euclidean k-means ranks like cosine.
* ``composition``: the phenotype fractions of each slide, square-rooted (the Hellinger embedding of a
  composition: Euclidean distance between square-rooted fractions is the Hellinger distance, which, unlike
  log-ratios, needs no pseudo-count for the zeros every sparse composition has).

Slides without tiles have no features: they are listed with an empty cluster, never silently dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip import formats, store
from histoclip.config import SectionSettings, settings_fields
from histoclip.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "ClusteringSettings",
    "SlideFeatures",
    "bootstrap_stability",
    "choose_k",
    "cluster_slides",
    "composition_features",
    "kmeans_labels",
    "map_coordinates",
    "read_slide_embeddings",
    "silhouette_by_k",
    "slide_embeddings_from_tiles",
    "slide_map_figure",
]


@dataclass(frozen=True)
class ClusteringSettings(SectionSettings, section="clustering"):
    """Config key ``clustering`` (plus the workflow ``seed``)."""

    slide_features: str
    k: int | str
    k_min: int
    k_max: int
    n_init: int
    bootstrap: int
    map_method: str
    seed: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClusteringSettings:
        values = settings_fields(cls, config, cls.config_section)
        if str(values["k"]).isdigit():  # `--config clustering='{k: 3}'` may arrive as "3"
            values["k"] = int(values["k"])
        return cls(**values)


@dataclass(frozen=True)
class SlideFeatures:
    """One row of features per slide; ``usable`` marks slides with tiles (features of the others are NaN)."""

    slide_ids: list[str]
    patient_ids: list[str]
    n_tiles: np.ndarray
    values: np.ndarray
    kind: str

    @property
    def usable(self) -> np.ndarray:
        return (self.n_tiles > 0) & np.isfinite(self.values).all(axis=1)


def _normalise_rows(values: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(values, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, values / norm, np.nan)


def read_slide_embeddings(path: str | Path) -> SlideFeatures:
    """Slide embeddings of the aggregation stage's table (``results/slides/{model}.parquet``), renormalised."""
    missing = {"slide_id", "patient_id", "n_tiles", "embedding"} - set(formats.slide_embedding_columns(path))
    if missing:
        raise InputError(
            f"lacks column(s) {', '.join(sorted(missing))}",
            where=str(path),
            fix="re-run the aggregation stage (it writes slide_id, patient_id, n_tiles, embedding)",
        )
    frame, values = formats.read_slide_embeddings(path)
    n_tiles = frame["n_tiles"].to_numpy(np.int64)
    values = values.astype(np.float64)
    values[n_tiles == 0] = np.nan
    return SlideFeatures(
        frame["slide_id"].astype(str).tolist(),
        frame["patient_id"].astype(str).tolist(),
        n_tiles,
        _normalise_rows(values),
        "embedding",
    )


def slide_embeddings_from_tiles(
    slide_ids: Sequence[str], patient_ids: Sequence[str], embedding_files: Sequence[str | Path]
) -> SlideFeatures:
    """Slide embeddings computed from the tile embeddings, one slide at a time, as the aggregation stage does
    (:func:`histoclip.cohort.aggregation.slide_embedding`): the fallback when no slide table is given."""
    from histoclip.cohort.aggregation import slide_embedding
    from histoclip.cohort.phenotypes import read_embedding_matrix

    rows, n_tiles = [], []
    for path in embedding_files:
        _, _, embeddings = read_embedding_matrix(path)
        n_tiles.append(len(embeddings))
        rows.append(slide_embedding(embeddings) if len(embeddings) else np.full(embeddings.shape[1], np.nan))
    values = np.stack(rows).astype(np.float64)
    return SlideFeatures(list(slide_ids), list(patient_ids), np.asarray(n_tiles), _normalise_rows(values), "embedding")


def composition_features(path: str | Path) -> SlideFeatures:
    """Square-rooted phenotype fractions (Hellinger embedding) from ``composition.tsv``."""
    table = formats.read_composition(path)
    columns = [c for c in table.columns if c.startswith(formats.PHENOTYPE_PREFIX)]
    fractions = table[columns].to_numpy(np.float64)
    return SlideFeatures(
        table["slide_id"].tolist(),
        table["patient_id"].tolist(),
        table["n_tiles"].to_numpy(np.int64),
        np.sqrt(np.clip(fractions, 0, None)),
        "composition",
    )


# --------------------------------------------------------------------------------------------------
# k-means, silhouette, bootstrap


def _kmeans(k: int, seed: int, n_init: int) -> Any:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=n_init, random_state=seed)


def kmeans_labels(values: np.ndarray, k: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """k-means labels renumbered by cluster size (0 = largest; ties by first appearance): the same partition
    always gets the same numbers."""
    labels = _kmeans(k, seed, n_init).fit_predict(values)
    return _renumber_by_size(labels, k)


def _renumber_by_size(labels: np.ndarray, k: int) -> np.ndarray:
    sizes = np.bincount(labels, minlength=k)
    first = np.array([np.argmax(labels == c) if sizes[c] else len(labels) for c in range(k)])
    order = np.lexsort((first, -sizes))
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    return rank[labels]


def silhouette_by_k(values: np.ndarray, ks: Sequence[int], seed: int = 0, n_init: int = 10) -> dict[int, float]:
    """Mean silhouette width of the k-means clustering for each k (ks must lie in [2, n - 1])."""
    from sklearn.metrics import silhouette_score

    return {int(k): float(silhouette_score(values, kmeans_labels(values, k, seed, n_init))) for k in ks}


def choose_k(silhouettes: Mapping[int, float]) -> int:
    """The k with the largest silhouette; ties go to the smaller k (the simpler model)."""
    best = max(silhouettes.values())
    return min(k for k, s in silhouettes.items() if s >= best - 1e-12)


def bootstrap_stability(
    values: np.ndarray, labels: np.ndarray, k: int, n_boot: int, seed: int = 0, n_init: int = 10
) -> np.ndarray:
    """Adjusted Rand index between ``labels`` and k-means refit on each bootstrap resample of the rows,
    compared on the distinct rows the resample holds (the slides it shares with the full clustering)."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(seed)
    n = len(values)
    scores = np.empty(n_boot)
    for b in range(n_boot):
        rows = rng.integers(0, n, n)
        model = _kmeans(k, int(rng.integers(2**31)), n_init).fit(values[rows])
        shared = np.unique(rows)
        scores[b] = adjusted_rand_score(labels[shared], model.predict(values[shared]))
    return scores


def map_coordinates(values: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """2-D coordinates of the slides and the axis names (PCA with explained variance, or t-SNE)."""
    n = len(values)
    if n == 1:
        return np.zeros((1, 2)), ["PC1", "PC2"]
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
        coords = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(values)
        return coords, ["t-SNE 1", "t-SNE 2"]
    from sklearn.decomposition import PCA

    components = min(2, n, values.shape[1])
    pca = PCA(components, random_state=seed).fit(values)
    coords = np.zeros((n, 2))
    coords[:, :components] = pca.transform(values)
    ratio = list(pca.explained_variance_ratio_) + [0.0] * (2 - components)
    return coords, [f"PC{i + 1} ({r:.0%} of variance)" for i, r in enumerate(ratio)]


# --------------------------------------------------------------------------------------------------
# The stage


def cluster_slides(features: SlideFeatures, settings: ClusteringSettings) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Cluster the slides that have features; returns the slide table and the summary for clustering.json.

    Table: slide_id, patient_id, cluster (Int64; <NA> for slides without tiles), n_tiles, silhouette (per slide), map_1,
    map_2 (the 2-D map of ``settings.map_method``). Summary: k, how it was chosen, silhouette per k tried,
    stability ARI median and 95 % interval, the map's method and axis names.
    """
    from threadpoolctl import threadpool_limits

    # One BLAS/OpenMP thread: slide-level problems are small, and on a shared node OpenMP threads spin-waiting
    # for busy cores made k-means 10-25 times slower than single-threaded (measured on the dev machine).
    with threadpool_limits(1):
        return _cluster_slides(features, settings)


def _cluster_slides(features: SlideFeatures, settings: ClusteringSettings) -> tuple[pd.DataFrame, dict[str, Any]]:
    from sklearn.metrics import silhouette_samples

    usable = features.usable
    values = features.values[usable]
    n = len(values)
    if (~usable).any():
        skipped = [s for s, ok in zip(features.slide_ids, usable, strict=True) if not ok]
        log.warning("%d slide(s) without tiles are not clustered: %s", len(skipped), ", ".join(skipped))
    k, how, silhouettes = _number_of_clusters(values, settings)
    labels = kmeans_labels(values, k, settings.seed, settings.n_init)
    per_slide = silhouette_samples(values, labels) if 2 <= k < n else np.full(n, np.nan)
    if k not in silhouettes and 2 <= k < n:
        silhouettes[k] = float(per_slide.mean())
    stability = (
        bootstrap_stability(values, labels, k, settings.bootstrap, settings.seed, settings.n_init)
        if settings.bootstrap and k >= 2
        else np.zeros(0)
    )
    cluster = pd.array([pd.NA] * len(features.slide_ids), dtype="Int64")
    cluster[np.flatnonzero(usable)] = labels
    sil = np.full(len(features.slide_ids), np.nan)
    sil[usable] = per_slide
    coords = np.full((len(features.slide_ids), 2), np.nan)
    coords[usable], axis_names = map_coordinates(values, settings.map_method, settings.seed)
    table = pd.DataFrame(
        {
            "slide_id": features.slide_ids,
            "patient_id": features.patient_ids,
            "cluster": cluster,
            "n_tiles": features.n_tiles,
            "silhouette": sil,
            "map_1": coords[:, 0],
            "map_2": coords[:, 1],
        }
    )
    summary = {
        "k": k,
        "k_chosen_by": how,
        "features": features.kind,
        "n_slides": n,
        "n_slides_without_tiles": int((~usable).sum()),
        "cluster_sizes": np.bincount(labels, minlength=k).tolist(),
        "silhouette": {str(kk): s for kk, s in sorted(silhouettes.items())},
        "stability": _stability_summary(stability),
        "map": {"method": settings.map_method, "axes": axis_names},
        "settings": asdict(settings),
    }
    return table, summary


def _number_of_clusters(values: np.ndarray, settings: ClusteringSettings) -> tuple[int, str, dict[int, float]]:
    """k, how it was chosen, and the silhouette of every k tried: ``clustering.k``, or with ``auto`` the best
    silhouette over k_min..k_max (one cluster, with a warning, for a cohort too small to choose)."""
    n = len(values)
    silhouettes: dict[int, float] = {}
    if settings.k == "auto":
        k_max = min(settings.k_max, n - 1)
        ks = list(range(max(2, settings.k_min), k_max + 1))
        if n == 0:
            raise InputError(
                "no slide has tiles: there is nothing to cluster",
                where="clustering",
                fix="look at results/qc/cohort.tsv for why every slide failed",
            )
        if ks:
            silhouettes = silhouette_by_k(values, ks, settings.seed, settings.n_init)
            k = choose_k(silhouettes)
            how = f"silhouette over k = {ks[0]}..{ks[-1]}"
        else:  # a pilot cohort of two or three slides: one cluster, said so, rather than a failed run
            k, how = 1, f"one cluster: {n} slide(s) with tiles are too few to choose k by silhouette"
            log.warning("clustering: %s (set clustering.k to fix k)", how)
    else:
        k = int(settings.k)
        if not 1 <= k <= n:
            raise InputError(
                f"k = {k} clusters for {n} slide(s) with tiles",
                where="clustering.k",
                fix=f"set clustering.k between 1 and {n}, or auto",
            )
        how = "fixed (clustering.k)"
    return k, how, silhouettes


def _stability_summary(stability: np.ndarray) -> dict[str, Any]:
    """The ``stability`` entry of the clustering summary: the bootstrap ARIs' median, 95 % interval and mean."""
    return {
        "metric": "adjusted Rand index, full clustering vs k-means refit on a bootstrap resample of the slides, "
        "on the slides the resample holds",
        "n_bootstrap": len(stability),
        "ari_median": float(np.median(stability)) if len(stability) else None,
        "ari_interval_95": [float(q) for q in np.percentile(stability, [2.5, 97.5])] if len(stability) else None,
        "ari_mean": float(stability.mean()) if len(stability) else None,
    }


def write_clustering(table: pd.DataFrame, summary: Mapping[str, Any], tsv: str | Path, json_path: str | Path) -> None:
    from histoclip.plots import write_tsv

    write_tsv(table, tsv)
    store.write_text_atomic(json_path, json.dumps(summary, indent=2) + "\n")


def slide_map_figure(
    table: pd.DataFrame,
    colourings: Mapping[str, Sequence[Any]],
    style: Any,
    axis_names: Sequence[str] = ("map 1", "map 2"),
) -> tuple[Any, pd.DataFrame]:
    """The slides on their 2-D map (``table``: slide_id, patient_id, map_1, map_2 as written by
    :func:`cluster_slides`), one panel per colouring (cluster, zero-shot call, label, …; values in table order).

    Returns the figure and its source data (slide_id, patient_id, map_1, map_2, one column per colouring).
    """
    from histoclip.plots import class_colours, new_figure

    data = table[["slide_id", "patient_id", "map_1", "map_2"]].copy()
    for name, values in colourings.items():
        data[name] = ["" if _missing(v) else str(v) for v in values]
    placed = data[["map_1", "map_2"]].notna().all(axis=1).to_numpy()
    panels = list(colourings)
    figure = new_figure(style, width_in=style.width_in, height_in=style.width_in / max(1, len(panels)) + 0.6)
    with style.context():
        axes = figure.subplots(1, max(1, len(panels)), squeeze=False)[0]
        for ax, name in zip(axes, panels, strict=False):
            groups = sorted(set(data[name]) - {""}, key=_natural) + ([""] if (data[name] == "").any() else [])
            colours = class_colours([g for g in groups if g])
            for group in groups:
                member = (data[name] == group).to_numpy() & placed
                if not member.any():
                    continue
                ax.scatter(
                    data["map_1"][member],
                    data["map_2"][member],
                    s=14,
                    c=colours.get(group, "#BBBBBB"),
                    label=group or "none",
                    linewidths=0,
                )
            ax.set_title(name.replace("_", " "))
            ax.set_xlabel(axis_names[0])
            ax.set_ylabel(axis_names[1])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(loc="best", frameon=False, markerscale=1.2, handletextpad=0.2, borderaxespad=0.2)
    return figure, data


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) or value == ""


def _natural(value: str) -> tuple[int, Any]:
    return (0, int(value)) if value.lstrip("-").isdigit() else (1, value)
