"""Tile phenotypes: sampling, mini-batch k-means, streaming assignment, naming, compositions, gallery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score, pairwise_distances_argmin_min

from histoclip import store
from histoclip.cohort.gallery import gallery_figure, read_gallery_pixels
from histoclip.cohort.phenotypes import (
    PhenotypeSettings,
    assign,
    class_composition,
    fit_phenotypes,
    name_phenotypes,
    phenotype_columns,
    run_phenotypes,
    sample_tiles,
)
from histoclip.config import default_config
from histoclip.errors import InputError
from histoclip.formats import TextClassifier
from histoclip.plots import FigureStyle

SHA = "a" * 64


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def write_embeddings(path: Path, x, y, embeddings: np.ndarray, sha: str = SHA, dtype=np.float16) -> None:
    dim = embeddings.shape[1]
    arrow_type = pa.float16() if dtype == np.float16 else pa.float32()
    table = pa.table(
        {
            "x": pa.array(np.asarray(x), pa.int64()),
            "y": pa.array(np.asarray(y), pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.astype(dtype).ravel(), arrow_type), dim),
        }
    )
    store.write_table_atomic(path, table, {"weights_sha256": sha, "dim": dim})


def blob_cohort(tmp: Path, n_slides=6, n_tiles=(150, 400), k=4, dim=32, noise=0.05, seed=0):
    """Slides whose tiles come from k well-separated unit-vector centres; returns ids, files, truth per slide."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((k, dim)))
    ids, files, truth = [], [], []
    for s in range(n_slides):
        n = int(rng.integers(*n_tiles))
        mix = rng.dirichlet(np.ones(k))
        labels = rng.choice(k, n, p=mix)
        emb = unit(centres[labels] + noise * rng.standard_normal((n, dim)))
        path = tmp / "emb" / f"slide{s}.parquet"
        write_embeddings(path, np.arange(n) * 224, np.zeros(n, int), emb)
        ids.append(f"slide{s}")
        files.append(path)
        truth.append(labels)
    return ids, files, truth, centres


def test_recovers_separated_clusters_and_writes_consistent_outputs(tmp_path):
    ids, files, truth, _ = blob_cohort(tmp_path)
    settings = PhenotypeSettings.from_config(
        default_config(
            {"seed": 1, "phenotypes": {"k": 4, "max_tiles_per_slide": 100, "batch_size": 256, "gallery_tiles": 5}}
        )
    )
    result = run_phenotypes(ids, [f"P{i // 2}" for i in range(len(ids))], files, tmp_path / "out", settings)
    assigned = [pq.read_table(tmp_path / "out" / "assignments" / f"{s}.parquet") for s in ids]
    predicted = np.concatenate([t.column("phenotype").to_numpy() for t in assigned])
    assert adjusted_rand_score(np.concatenate(truth), predicted) == pytest.approx(1.0)

    composition = pd.read_csv(tmp_path / "out" / "composition.tsv", sep="\t")
    columns = phenotype_columns(4)
    assert list(composition.columns) == ["slide_id", "patient_id", "n_tiles", *columns]
    np.testing.assert_allclose(composition[columns].sum(axis=1), 1.0, atol=1e-5)
    for row, table, labels in zip(composition.itertuples(), assigned, truth, strict=True):
        assert row.n_tiles == table.num_rows == len(labels)
        counts = np.bincount(table.column("phenotype").to_numpy(), minlength=4) / table.num_rows
        np.testing.assert_allclose([getattr(row, c) for c in columns], counts, atol=1e-6)
    # phenotype_00 is the commonest phenotype of the sample, and the cohort totals agree with the slides
    phenotypes = pd.read_csv(tmp_path / "out" / "phenotypes.tsv", sep="\t")
    assert phenotypes["n_tiles"].sum() == sum(len(t) for t in truth)
    assert np.all(np.diff(result.model.sample_sizes) <= 0)
    written = pq.read_table(tmp_path / "out" / "centroids.parquet").column("centroid").combine_chunks()
    centroids = written.values.to_numpy().reshape(-1, written.type.list_size)
    np.testing.assert_allclose(centroids, result.model.centroids, atol=1e-6)
    meta = store.read_metadata(tmp_path / "out" / "assignments" / "slide0.parquet")
    assert meta["slide_id"] == "slide0" and meta["k"] == 4 and meta["model_weights_sha256"] == SHA
    means = [pq.read_table(f).column("embedding").combine_chunks().values.to_numpy() for f in files]
    np.testing.assert_allclose(
        result.slide_means, np.stack([m.astype(np.float64).reshape(-1, 32).mean(axis=0) for m in means]), rtol=1e-5
    )
    # reading and assigning on two threads gives the same files
    run_phenotypes(ids, [f"P{i // 2}" for i in range(len(ids))], files, tmp_path / "out2", settings, threads=2)
    for name in ("composition.tsv", "phenotypes.tsv", "gallery_tiles.tsv"):
        assert (tmp_path / "out2" / name).read_text() == (tmp_path / "out" / name).read_text()
    for s in ids:
        a = pq.read_table(tmp_path / "out" / "assignments" / f"{s}.parquet")
        assert a.equals(pq.read_table(tmp_path / "out2" / "assignments" / f"{s}.parquet"))


def test_streaming_assignment_equals_in_memory_nearest_centroid(tmp_path):
    # overlapping clusters, so that the test is about the streaming (files, order, dtypes), not easy geometry
    ids, files, _, _ = blob_cohort(tmp_path, n_slides=5, noise=0.6, seed=3)
    settings = PhenotypeSettings.from_config(
        default_config({"seed": 0, "phenotypes": {"k": 5, "max_tiles_per_slide": 60, "batch_size": 128}})
    )
    result = run_phenotypes(ids, ids, files, tmp_path / "out", settings)
    everything = np.concatenate(
        [pq.read_table(f).column("embedding").combine_chunks().values.to_numpy() for f in files]
    )
    everything = everything.astype(np.float64).reshape(-1, 32)
    expected, expected_distance = pairwise_distances_argmin_min(everything, result.model.centroids)
    tables = [pq.read_table(tmp_path / "out" / "assignments" / f"{s}.parquet") for s in ids]
    streamed = np.concatenate([t.column("phenotype").to_numpy() for t in tables])
    distance = np.concatenate([t.column("distance").to_numpy() for t in tables])
    np.testing.assert_array_equal(streamed, expected)
    np.testing.assert_allclose(distance, expected_distance, rtol=1e-5)
    xs = np.concatenate([t.column("x").to_numpy() for t in tables])
    np.testing.assert_array_equal(xs, np.concatenate([pq.read_table(f).column("x").to_numpy() for f in files]))


def test_fit_matches_scikit_learn_minibatch_kmeans(tmp_path):
    from sklearn.cluster import MiniBatchKMeans

    rng = np.random.default_rng(0)
    sample = unit(rng.standard_normal((500, 16))).astype(np.float32)
    settings = PhenotypeSettings.from_config(
        default_config({"seed": 7, "phenotypes": {"k": 3, "batch_size": 100, "n_init": 2, "max_iter": 20}})
    )
    model = fit_phenotypes(sample, settings)
    reference = MiniBatchKMeans(3, batch_size=100, n_init=2, max_iter=20, random_state=7).fit(sample)
    # same centroids, renumbered by size
    order = np.argsort(-np.bincount(reference.labels_, minlength=3), kind="stable")
    np.testing.assert_allclose(model.centroids, reference.cluster_centers_[order], rtol=1e-6)


def test_sample_is_stratified_bounded_and_independent_of_other_slides(tmp_path):
    ids, files, truth, _ = blob_cohort(tmp_path, n_slides=6)  # 150-400 tiles a slide
    tables = {s: pq.read_table(f).column("embedding").combine_chunks() for s, f in zip(ids, files, strict=True)}
    rows = {s: t.values.to_numpy().reshape(-1, 32).astype(np.float32) for s, t in tables.items()}

    def origin(sample):  # which slide each sampled tile came from
        return [next(s for s, v in rows.items() if (v == tile).all(axis=1).any()) for tile in sample]

    # the cap is not reached: every slide gives max_tiles_per_slide distinct tiles
    whole, sha = sample_tiles(
        ids,
        files,
        PhenotypeSettings.from_config(
            default_config({"phenotypes": {"k": 2, "max_tiles_per_slide": 50, "max_sample_tiles": 10_000}})
        ),
    )
    assert sha == SHA and len(whole) == 300 and len(np.unique(whole, axis=0)) == 300
    assert sorted(pd.Series(origin(whole)).value_counts().tolist()) == [50] * 6
    # the cap is reached: at most max_sample_tiles, still at most max_tiles_per_slide from any slide
    capped, _ = sample_tiles(
        ids,
        files,
        PhenotypeSettings.from_config(
            default_config({"phenotypes": {"k": 2, "max_tiles_per_slide": 50, "max_sample_tiles": 120}})
        ),
    )
    counts = pd.Series(origin(capped)).value_counts()
    assert len(capped) == 120 and counts.max() <= 50 and len(counts) == 3
    # a slide's draw does not depend on the rest of the cohort, and a smaller quota is a subset of a larger one
    for s, f in zip(ids[:2], files[:2], strict=True):
        alone, _ = sample_tiles(
            [s], [f], PhenotypeSettings.from_config(default_config({"phenotypes": {"k": 2, "max_tiles_per_slide": 50}}))
        )
        np.testing.assert_array_equal(alone, whole[np.array(origin(whole)) == s])
        fewer, _ = sample_tiles(
            [s], [f], PhenotypeSettings.from_config(default_config({"phenotypes": {"k": 2, "max_tiles_per_slide": 20}}))
        )
        assert {t.tobytes() for t in fewer} <= {t.tobytes() for t in alone}
    with pytest.raises(InputError, match="phenotypes.k"):
        sample_tiles(
            ids[:1],
            files[:1],
            PhenotypeSettings.from_config(default_config({"phenotypes": {"k": 40, "max_tiles_per_slide": 30}})),
        )


def test_mixed_model_weights_are_refused(tmp_path):
    ids, files, _, _ = blob_cohort(tmp_path, n_slides=2)
    emb = unit(np.random.default_rng(0).standard_normal((10, 32)))
    write_embeddings(files[1], np.arange(10), np.arange(10), emb, sha="b" * 64)
    with pytest.raises(InputError, match="same model"):
        sample_tiles(ids, files, PhenotypeSettings.from_config(default_config({"phenotypes": {"k": 2}})))


def test_assign_handles_empty_slides_and_empty_slide_composition(tmp_path):
    labels, distance = assign(np.zeros((0, 4), np.float32), np.eye(4))
    assert len(labels) == len(distance) == 0
    ids, files, _, _ = blob_cohort(tmp_path, n_slides=3, k=2)
    write_embeddings(files[2], [], [], np.zeros((0, 32), np.float32))
    result = run_phenotypes(
        ids,
        ids,
        files,
        tmp_path / "out",
        PhenotypeSettings.from_config(default_config({"phenotypes": {"k": 2, "batch_size": 64}})),
    )
    empty = result.composition.set_index("slide_id").loc["slide2"]
    assert empty["n_tiles"] == 0 and np.isnan(empty[phenotype_columns(2)].astype(float)).all()
    assert pq.read_table(tmp_path / "out" / "assignments" / "slide2.parquet").num_rows == 0


def classifier(classes, weights, called=None, sha=SHA) -> TextClassifier:
    return TextClassifier(
        list(classes), called or [True] * len(classes), np.asarray(weights, float), 100.0, {"weights_sha256": sha}
    )


def test_nearest_class_naming_on_constructed_centroids():
    rng = np.random.default_rng(0)
    weights = np.linalg.qr(rng.standard_normal((64, 4)))[0].T  # orthonormal class directions
    classes = ["tumour", "stroma", "necrosis", "fat"]
    # centroids: scaled and mixed versions of class directions (k-means centroids of unit vectors are shorter)
    centroids = np.stack(
        [0.3 * weights[2] + 0.05 * weights[0], 0.8 * weights[0] + 0.1 * weights[2], 0.5 * weights[3] + 0.2 * weights[1]]
    )
    named = name_phenotypes(centroids, classes, weights)
    assert named["nearest_class"].tolist() == ["necrosis", "tumour", "fat"]
    assert named["runner_up_class"].tolist() == ["tumour", "necrosis", "stroma"]
    expected = unit(centroids) @ weights.T
    np.testing.assert_allclose(named["similarity"], expected.max(axis=1))
    assert (named["similarity"] >= named["runner_up_similarity"]).all()


def test_class_composition_sums_phenotypes_that_share_a_name():
    columns = phenotype_columns(3)
    composition = pd.DataFrame(
        {"slide_id": ["a", "b", "c"], "patient_id": ["p", "q", "q"], "n_tiles": [10, 4, 0]}
        | dict(zip(columns, [[0.5, 0.25, np.nan], [0.3, 0.25, np.nan], [0.2, 0.5, np.nan]], strict=True))
    )
    out = class_composition(composition, ["necrosis", "stroma", "necrosis"], ["tumour", "stroma", "necrosis", "fat"])
    assert list(out.columns) == ["slide_id", "patient_id", "n_tiles", "tumour", "stroma", "necrosis", "fat"]
    np.testing.assert_allclose(out["necrosis"][:2], [0.7, 0.75])
    np.testing.assert_allclose(out["stroma"][:2], [0.3, 0.25])
    assert (out["tumour"][:2] == 0).all() and out.iloc[2, 3:].isna().all()
    np.testing.assert_allclose(out[["tumour", "stroma", "necrosis", "fat"]][:2].sum(axis=1), 1.0)


def test_outputs_name_phenotypes_by_every_prompt_set(tmp_path):
    ids, files, truth, centres = blob_cohort(tmp_path, k=3)
    first = classifier(["adeno", "necrosis", "fat", "stroma"], np.vstack([centres, unit(np.ones((1, 32)))]))
    second = classifier(["x", "y", "z"], centres[::-1])
    result = run_phenotypes(
        ids,
        ids,
        files,
        tmp_path / "out",
        PhenotypeSettings.from_config(default_config({"phenotypes": {"k": 3, "batch_size": 128}})),
        {"demo": first, "other": second},
    )
    phenotypes = pd.read_csv(tmp_path / "out" / "phenotypes.tsv", sep="\t")
    assert sorted(phenotypes["nearest_class"]) == ["adeno", "fat", "necrosis"]
    assert (phenotypes["similarity"] > 0.95).all()
    assert (phenotypes["nearest_class_demo"] == phenotypes["nearest_class"]).all()
    assert sorted(phenotypes["nearest_class_other"]) == ["x", "y", "z"]
    by_class = pd.read_csv(tmp_path / "out" / "class_composition.tsv", sep="\t")
    assert list(by_class.columns) == ["slide_id", "patient_id", "n_tiles", "adeno", "necrosis", "fat", "stroma"]
    for row, labels in zip(by_class.itertuples(), truth, strict=True):
        true = np.bincount(labels, minlength=3) / len(labels)
        np.testing.assert_allclose([row.adeno, row.necrosis, row.fat, row.stroma], [*true, 0.0], atol=1e-6)
    # a classifier from other weights is refused
    with pytest.raises(InputError, match="encode_prompts"):
        run_phenotypes(
            ids,
            ids,
            files,
            tmp_path / "o2",
            PhenotypeSettings.from_config(default_config({"phenotypes": {"k": 3}})),
            {"bad": classifier(["a"], centres[:1], sha="c" * 64)},
        )
    assert len(result.gallery)


def test_gallery_tiles_are_the_most_central_with_a_cap_per_slide(tmp_path):
    ids, files, _, _ = blob_cohort(tmp_path, n_slides=5, k=2, noise=0.3)
    settings = PhenotypeSettings.from_config(
        default_config(
            {"phenotypes": {"k": 2, "batch_size": 128, "gallery_tiles": 6, "gallery_max_tiles_per_slide": 2}}
        )
    )
    result = run_phenotypes(ids, ids, files, tmp_path / "out", settings)
    gallery = pd.read_csv(tmp_path / "out" / "gallery_tiles.tsv", sep="\t")
    tables = {s: pq.read_table(tmp_path / "out" / "assignments" / f"{s}.parquet").to_pandas() for s in ids}
    for phenotype, group in gallery.groupby("phenotype"):
        p = int(phenotype.rsplit("_", 1)[1])
        assert len(group) == 6 and group["slide_id"].value_counts().max() <= 2
        assert group["rank"].tolist() == list(range(6)) and group["distance"].is_monotonic_increasing
        # brute force: two nearest tiles of each slide, then the six nearest of those
        candidates = pd.concat(
            [t[t["phenotype"] == p].nsmallest(2, "distance").assign(slide_id=s) for s, t in tables.items()]
        ).nsmallest(6, "distance")
        np.testing.assert_allclose(group["distance"], candidates["distance"], rtol=1e-6)
        for row in group.itertuples():
            tile = tables[row.slide_id].query("x == @row.x and y == @row.y")
            assert int(tile["phenotype"].iloc[0]) == p
    assert len(result.gallery) == 12


def test_gallery_reads_the_tiles_pixels_from_the_slide(tmp_path):
    from histoclip.demo import write_pyramid_tiff
    from histoclip.tiling.grid import TilingParams, run_tiling

    rgb = np.full((512, 512, 3), 240, np.uint8)
    rgb[:, :256] = (200, 40, 120)  # left half pink tissue, right half blue tissue
    rgb[:, 256:] = (60, 60, 180)
    slide = tmp_path / "s.tiff"
    write_pyramid_tiff(slide, rgb, mpp=0.25)  # tiles at 0.5 mpp: read from level 0 and resized by 2
    tiles = tmp_path / "tiles" / "s.parquet"
    run_tiling(
        slide,
        "s",
        tiles,
        tmp_path / "qc.png",
        params=TilingParams.from_config(default_config({"tiling": {"tile_px": 64, "min_tissue_fraction": 0.0}})),
    )
    meta = store.read_metadata(tiles)
    assert meta["tile_px"] == 64 and meta["read_tile_px"] == 128
    gallery = pd.DataFrame(
        {
            "phenotype": ["phenotype_00", "phenotype_01"],
            "rank": [0, 0],
            "slide_id": ["s", "s"],
            "x": [0, 384],
            "y": [0, 128],
            "distance": [0.1, 0.2],
        }
    )
    images = read_gallery_pixels(gallery, {"s": slide}, {"s": tiles})
    assert [im.shape for im in images] == [(64, 64, 3), (64, 64, 3)]
    np.testing.assert_allclose(images[0].reshape(-1, 3).mean(axis=0), (200, 40, 120), atol=6)
    np.testing.assert_allclose(images[1].reshape(-1, 3).mean(axis=0), (60, 60, 180), atol=6)
    phenotypes = pd.DataFrame(
        {
            "phenotype": ["phenotype_00", "phenotype_01"],
            "fraction": [0.5, 0.5],
            "nearest_class": ["stroma", "tumour"],
            "similarity": [0.4, 0.3],
        }
    )
    figure = gallery_figure(
        gallery, phenotypes, images, FigureStyle.from_config(default_config({"figures": {"dpi": 50}}))
    )
    assert len(figure.axes) == 2
    with pytest.raises(InputError, match="cohort sheet"):
        read_gallery_pixels(gallery.assign(slide_id="gone"), {"s": slide}, {"s": tiles})
