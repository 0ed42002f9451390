"""Slide clustering: k by silhouette, bootstrap stability, features from slide embeddings or compositions, map."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score, silhouette_score

from histoclip import store
from histoclip.cohort.clustering import (
    ClusteringSettings,
    SlideFeatures,
    bootstrap_stability,
    choose_k,
    cluster_slides,
    composition_features,
    kmeans_labels,
    map_coordinates,
    read_slide_embeddings,
    silhouette_by_k,
    slide_embeddings_from_tiles,
    slide_map_figure,
    write_clustering,
)
from histoclip.config import default_config
from histoclip.errors import InputError
from histoclip.plots import FigureStyle, save_figure


def blobs(n=120, k=4, dim=8, std=0.5, seed=0):
    return make_blobs(n, n_features=dim, centers=k, cluster_std=std, random_state=seed)


def features(values, n_tiles=None, kind="embedding") -> SlideFeatures:
    n = len(values)
    ids = [f"s{i:03d}" for i in range(n)]
    tiles = np.full(n, 10) if n_tiles is None else np.asarray(n_tiles)
    return SlideFeatures(ids, [f"p{i // 2}" for i in range(n)], tiles, np.asarray(values, float), kind)


def test_kmeans_recovers_separated_blobs_numbered_by_size():
    values, truth = make_blobs([50, 30, 20], n_features=6, cluster_std=0.3, random_state=2)
    labels = kmeans_labels(values, 3)
    assert adjusted_rand_score(truth, labels) == 1.0
    assert np.bincount(labels).tolist() == [50, 30, 20]  # cluster 0 is the largest


@pytest.mark.parametrize("k", [3, 5])
def test_silhouette_picks_the_true_k_and_matches_scikit_learn(k):
    values, _ = blobs(k=k, seed=k)
    scores = silhouette_by_k(values, range(2, 9))
    assert choose_k(scores) == k
    reference = KMeans(k, n_init=10, random_state=0).fit_predict(values)
    assert scores[k] == pytest.approx(silhouette_score(values, reference))


def test_choose_k_prefers_the_smaller_k_on_ties():
    assert choose_k({2: 0.5, 3: 0.5, 4: 0.1}) == 2


def test_bootstrap_stability_high_for_separated_low_for_structureless():
    values, _ = blobs(k=4)
    separated = bootstrap_stability(values, kmeans_labels(values, 4), 4, n_boot=20, n_init=3)
    noise = np.random.default_rng(1).standard_normal((120, 16))
    structureless = bootstrap_stability(noise, kmeans_labels(noise, 4), 4, n_boot=20, n_init=3)
    assert np.median(separated) > 0.95
    assert np.median(structureless) < 0.5
    assert len(separated) == len(structureless) == 20


def test_cluster_slides_auto_k_summary_and_slides_without_tiles(tmp_path):
    values, truth = blobs(n=60, k=3, seed=4)
    values = np.vstack([values, np.full((1, 8), np.nan)])
    slide = features(values, n_tiles=[10] * 60 + [0])
    table, summary = cluster_slides(
        slide,
        ClusteringSettings.from_config(
            default_config({"clustering": {"k": "auto", "k_min": 2, "k_max": 6, "bootstrap": 10, "n_init": 3}})
        ),
    )
    assert summary["k"] == 3 and summary["k_chosen_by"].startswith("silhouette")
    assert set(summary["silhouette"]) == {"2", "3", "4", "5", "6"}
    assert summary["stability"]["ari_median"] > 0.95 and summary["stability"]["n_bootstrap"] == 10
    lo, hi = summary["stability"]["ari_interval_95"]
    assert lo <= summary["stability"]["ari_median"] <= hi
    assert list(table.columns[:3]) == ["slide_id", "patient_id", "cluster"]
    assert pd.isna(table["cluster"].iloc[-1]) and summary["n_slides_without_tiles"] == 1
    assert adjusted_rand_score(truth, table["cluster"].iloc[:-1].astype(int)) == 1.0
    write_clustering(table, summary, tmp_path / "c.tsv", tmp_path / "c.json")
    back = pd.read_csv(tmp_path / "c.tsv", sep="\t", dtype={"cluster": "Int64"})
    assert back["cluster"].isna().sum() == 1 and json.loads((tmp_path / "c.json").read_text())["k"] == 3


def test_fixed_k_and_bad_k():
    values, _ = blobs(n=30, k=2)
    table, summary = cluster_slides(
        features(values), ClusteringSettings.from_config(default_config({"clustering": {"k": 2, "bootstrap": 0}}))
    )
    assert (
        summary["k"] == 2 and summary["k_chosen_by"].startswith("fixed") and summary["stability"]["ari_median"] is None
    )
    assert set(summary["silhouette"]) == {"2"}
    with pytest.raises(InputError, match="clustering.k"):
        cluster_slides(features(values[:3]), ClusteringSettings.from_config(default_config({"clustering": {"k": 5}})))


def test_slide_embeddings_from_tiles_and_from_the_aggregation_file(tmp_path):
    rng = np.random.default_rng(0)
    files, means = [], []
    for i, n in enumerate([5, 9, 0]):
        emb = rng.standard_normal((n, 4)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True) if n else 1
        table = pa.table(
            {
                "x": pa.array(np.arange(n), pa.int64()),
                "y": pa.array(np.arange(n), pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), 4),
            }
        )
        store.write_table_atomic(tmp_path / f"s{i}.parquet", table, {})
        files.append(tmp_path / f"s{i}.parquet")
        means.append(emb.mean(axis=0) / np.linalg.norm(emb.mean(axis=0)) if n else np.full(4, np.nan))
    slide = slide_embeddings_from_tiles(["a", "b", "c"], ["p", "p", "q"], files)
    np.testing.assert_allclose(slide.values[:2], np.stack(means[:2]), rtol=1e-5)
    assert slide.usable.tolist() == [True, True, False]

    aggregated = pa.table(
        {
            "slide_id": ["a", "b", "c"],
            "patient_id": ["p", "p", "q"],
            "n_tiles": pa.array([5, 9, 0], pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array((np.nan_to_num(np.stack(means)) * 3).astype(np.float32).ravel()), 4
            ),
        }
    )
    store.write_table_atomic(tmp_path / "slides.parquet", aggregated, {})
    read = read_slide_embeddings(tmp_path / "slides.parquet")
    np.testing.assert_allclose(read.values[:2], slide.values[:2], rtol=1e-5)  # renormalised
    assert read.usable.tolist() == [True, True, False]
    store.write_table_atomic(tmp_path / "bad.parquet", aggregated.drop(["n_tiles"]), {})
    with pytest.raises(InputError, match="n_tiles"):
        read_slide_embeddings(tmp_path / "bad.parquet")


def test_composition_features_are_hellinger(tmp_path):
    table = pd.DataFrame(
        {
            "slide_id": ["a", "b"],
            "patient_id": ["p", "q"],
            "n_tiles": [4, 0],
            "phenotype_00": [0.25, np.nan],
            "phenotype_01": [0.75, np.nan],
        }
    )
    table.to_csv(tmp_path / "composition.tsv", sep="\t", index=False)
    slide = composition_features(tmp_path / "composition.tsv")
    np.testing.assert_allclose(slide.values[0], [0.5, np.sqrt(0.75)])
    assert slide.usable.tolist() == [True, False] and slide.kind == "composition"
    # Euclidean distance of the features is the Hellinger distance (times sqrt 2)
    p, q = np.array([0.25, 0.75]), np.array([0.6, 0.4])
    assert np.linalg.norm(np.sqrt(p) - np.sqrt(q)) == pytest.approx(np.sqrt(((np.sqrt(p) - np.sqrt(q)) ** 2).sum()))


def test_map_and_figure_source_data(tmp_path):
    values, truth = blobs(n=40, k=2, dim=5)
    coords, names = map_coordinates(values, "pca")
    from sklearn.decomposition import PCA

    np.testing.assert_allclose(np.abs(coords), np.abs(PCA(2).fit_transform(values)), atol=1e-8)
    assert names[0].startswith("PC1")
    tsne, tsne_names = map_coordinates(values, "tsne")
    assert tsne.shape == (40, 2) and tsne_names[0].startswith("t-SNE")
    slide = features(np.vstack([values, np.full((1, 5), np.nan)]), n_tiles=[3] * 40 + [0])
    table, summary = cluster_slides(
        slide, ClusteringSettings.from_config(default_config({"clustering": {"k": 2, "bootstrap": 0}}))
    )
    np.testing.assert_allclose(table[["map_1", "map_2"]].to_numpy()[:40], coords, atol=1e-8)
    assert table[["map_1", "map_2"]].iloc[-1].isna().all() and summary["map"]["axes"] == names
    style = FigureStyle.from_config(default_config({"figures": {"dpi": 50, "formats": ["png"]}}))
    colourings = {"cluster": table["cluster"].tolist(), "label": [str(t) for t in truth] + [None]}
    figure, data = slide_map_figure(table, colourings, style, summary["map"]["axes"])
    written = save_figure(figure, tmp_path / "map", style, data=data)
    assert [p.name for p in written] == ["map.png", "map.tsv"]
    source = pd.read_csv(tmp_path / "map.tsv", sep="\t", keep_default_na=False)
    assert list(source.columns) == ["slide_id", "patient_id", "map_1", "map_2", "cluster", "label"]
    assert source["cluster"].iloc[-1] == "" and source["map_1"].iloc[-1] == ""
    assert source["label"].iloc[:40].tolist() == [str(t) for t in truth]
    assert len(figure.axes) == 2


def test_a_pilot_cohort_too_small_for_auto_k_is_one_cluster_and_no_tiles_at_all_is_an_error():
    values, _ = blobs(n=2, k=1)
    table, summary = cluster_slides(
        features(values, n_tiles=[10, 10]),
        ClusteringSettings.from_config(default_config({"clustering": {"k": "auto", "bootstrap": 5}})),
    )
    assert summary["k"] == 1 and "too few" in summary["k_chosen_by"]
    assert table["cluster"].tolist() == [0, 0]
    empty = features(np.full((2, 8), np.nan), n_tiles=[0, 0])
    with pytest.raises(InputError, match="no slide has tiles"):
        cluster_slides(empty, ClusteringSettings.from_config(default_config({"clustering": {"k": "auto"}})))
