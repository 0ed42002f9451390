"""Exports: QuPath GeoJSON per slide, AnnData (slides and tiles), CLAM/TRIDENT-layout HDF5.

The fixture cohort is made by the library itself: a real Aperio slide (CMU-1-Small-Region, 20x: tiles read at the
target resolution), the same slide under a second id, a synthetic 40x slide without a 20x level (tiles read at
level 0 and resized, the case where CLAM's and TRIDENT's coordinates conventions part) whose tissue has a hole,
and an unreadable slide recorded as failed; tiled with their tissue masks, given unit embeddings, zero-shot scored
against a text classifier, clustered into phenotypes and slides. Every export is then read back the way its
consumer reads it.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import openslide
import pandas as pd
import pytest
import shapely

from histoclip import formats
from histoclip.cohort.aggregation import aggregate_slides
from histoclip.cohort.clustering import ClusteringSettings, cluster_slides, read_slide_embeddings, write_clustering
from histoclip.cohort.phenotypes import PhenotypeSettings, run_phenotypes
from histoclip.config import default_config
from histoclip.errors import InputError
from histoclip.export import h5ad, mil_h5, qupath
from histoclip.export.tiles import ModelResults
from histoclip.sheets import read_cohort_sheet
from histoclip.tiling.grid import run_tiling
from histoclip.zeroshot.calls import call_cohort

SHA = "cd" * 32
DIM = 16
CLASSES = ["tumour", "stroma", "necrosis", "background"]
PYRAMID_TISSUE = (slice(224, 2912), slice(224, 3360))  # rows, cols of level 0 (0.25 µm/px)
PYRAMID_HOLE = (slice(896, 2464), slice(1120, 2688))  # 392 µm square: above tissue.max_hole_area_mm2, kept


def pyramid_rgb() -> np.ndarray:
    """A 40x (0.25 µm/px) field: glass, a pink tissue block with a glass hole, and a red ramp along x so a tile's
    pixels say where they came from."""
    rgb = np.full((3136, 3584, 3), 240, np.uint8)
    tissue = np.zeros(rgb.shape[:2], bool)
    tissue[PYRAMID_TISSUE] = True
    tissue[PYRAMID_HOLE] = False
    ramp = np.linspace(120, 230, rgb.shape[1]).astype(np.uint8)
    colour = np.stack(np.broadcast_arrays(ramp[None, :], np.uint8(40), np.uint8(150)), axis=-1)
    rgb[tissue] = np.broadcast_to(colour, rgb.shape)[tissue]
    return rgb


def write_embeddings(path, x, y, rng, status="ok"):
    if not len(x):
        formats.write_failed_embedding_file(path, DIM, "float32", {"weights_sha256": SHA, "dim": DIM, "status": status})
        return
    values = rng.normal(size=(len(x), DIM)).astype(np.float32)
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    meta = {"model_name": "tiny", "model": "config/models/tiny.json", "weights_sha256": SHA, "dim": DIM}
    writer = formats.EmbeddingFileWriter(path, x, y, DIM, "float32", {**meta, "status": status}, row_group_rows=64)
    writer.add(values)
    writer.commit(str(path))


@pytest.fixture(scope="module")
def cohort(shared_data, tmp_path_factory):
    from histoclip.demo import write_pyramid_tiff

    root = tmp_path_factory.mktemp("export")
    write_pyramid_tiff(root / "pyramid.tiff", pyramid_rgb(), mpp=0.25)
    cmu = shared_data / "svs" / "CMU-1-Small-Region.svs"
    sheet = pd.DataFrame(
        {
            "slide_id": ["cmu-a", "cmu-b", "pyr", "broken"],
            "patient_id": ["p1", "p2", "p3", "p4"],
            "path": [cmu, cmu, root / "pyramid.tiff", shared_data / "broken" / "openslide-python-unreadable.svs"],
            "label": ["tumour", "stroma", "tumour", ""],
            "split": ["test", "test", "train", "test"],
            "age": ["61", "70", "55.5", ""],
        }
    )
    sheet.to_csv(root / "slides.tsv", sep="\t", index=False)
    records = read_cohort_sheet(root / "slides.tsv")
    rng = np.random.default_rng(0)
    files: dict[str, dict[str, object]] = {}
    for record in records:
        paths = {
            "tiles": root / "tiles" / f"{record.slide_id}.parquet",
            "mask": root / "qc" / "tissue" / f"{record.slide_id}.png",
            "embeddings": root / "embeddings" / f"{record.slide_id}.parquet",
        }
        meta = run_tiling(
            record.path,
            record.slide_id,
            paths["tiles"],
            root / "qc" / f"{record.slide_id}.png",
            mask_out=paths["mask"],
            on_slide_error="record",
        )
        x, y, _ = formats.read_tile_file(paths["tiles"])
        write_embeddings(paths["embeddings"], x, y, rng, status=meta["status"])
        files[record.slide_id] = paths
    ids = [r.slide_id for r in records]
    embedding_files = [files[s]["embeddings"] for s in ids]
    weights = rng.normal(size=(len(CLASSES), DIM))
    classifier = formats.TextClassifier(
        CLASSES,
        [True, True, True, False],
        weights / np.linalg.norm(weights, axis=1, keepdims=True),
        50.0,
        {"weights_sha256": SHA, "prompt_set": "demo"},
    )
    call_cohort(records, embedding_files, classifier, root / "zeroshot" / "demo")
    calls = formats.read_calls(root / "zeroshot" / "demo" / "calls.tsv")  # as the exports read it
    settings = PhenotypeSettings.from_config(default_config({"phenotypes": {"k": 3}}))
    run_phenotypes(
        ids, [r.patient_id for r in records], embedding_files, root / "phenotypes", settings, {"demo": classifier}
    )
    aggregate_slides(ids, [r.patient_id for r in records], embedding_files, root / "slides.parquet")
    clustering = ClusteringSettings.from_config(default_config({"clustering": {"k": 2, "bootstrap": 0}}))
    table, summary = cluster_slides(read_slide_embeddings(root / "slides.parquet"), clustering)
    write_clustering(table, summary, root / "clusters.tsv", root / "clustering.json")
    results = ModelResults.of(
        "tiny",
        {"demo": root / "zeroshot/demo/tile_scores"},
        {"demo": root / "zeroshot/demo/calls.tsv"},
        root / "phenotypes",
    )
    return {"root": root, "ids": ids, "files": files, "results": results, "calls": calls.set_index("slide_id")}


def export_geojson(cohort, results=None, out="qupath"):
    root, ids, files = cohort["root"], cohort["ids"], cohort["files"]
    outputs = [root / out / f"{s}.geojson" for s in ids]
    qupath.export_qupath_shard(
        ids,
        [files[s]["tiles"] for s in ids],
        [files[s]["mask"] for s in ids],
        [files[s]["embeddings"] for s in ids],
        results or cohort["results"],
        outputs,
        root / out / "index" / "shard00000.tsv",
    )
    return {s: json.loads(path.read_text()) for s, path in zip(ids, outputs, strict=True)}


def pixel_edge_outline(mask: np.ndarray) -> shapely.Geometry:
    """The mask's contours drawn independently of the export: the union of its pixels' squares (mask pixel units)."""
    rows, cols = np.nonzero(mask)
    return shapely.union_all(shapely.box(cols, rows, cols + 1, rows + 1))


def tissue_rasterised(polygons, shape) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    union = shapely.union_all(polygons)
    return shapely.contains_xy(union, xx.ravel() + 0.5, yy.ravel() + 0.5).reshape(shape)


# --- tissue outlines


def test_mask_polygons_trace_each_region_with_its_holes():
    mask = np.zeros((40, 50), bool)
    mask[2:20, 3:30] = True
    mask[6:12, 10:18] = False  # a hole
    mask[25:35, 35:48] = True  # a second region, touching nothing
    mask[30, 5] = mask[31, 6] = True  # two pixels that touch at a corner only
    polygons = qupath.mask_polygons(mask)
    assert all(p.is_valid for p in polygons)
    assert len(polygons) == 4
    assert [len(p.interiors) for p in polygons] == [1, 0, 0, 0]
    np.testing.assert_array_equal(tissue_rasterised(polygons, mask.shape), mask)
    outline = pixel_edge_outline(mask)
    assert shapely.hausdorff_distance(shapely.union_all(polygons).boundary, outline.boundary) <= 1.0
    assert qupath.mask_polygons(np.zeros((5, 5), bool)) == []


# --- QuPath GeoJSON


def test_geojson_tissue_annotations_are_the_tissue_mask_within_a_pixel(cohort):
    collections = export_geojson(cohort)
    for slide in ("cmu-a", "pyr"):
        tissue = formats.read_tissue_mask(cohort["files"][slide]["mask"])
        annotations = [f for f in collections[slide]["features"] if f["properties"]["objectType"] == "annotation"]
        assert annotations and all(
            f["properties"]["classification"] == {"name": "Tissue", "color": [0, 200, 0]} for f in annotations
        )
        polygons = [shapely.geometry.shape(f["geometry"]) for f in annotations]
        assert all(p.is_valid and p.geom_type == "Polygon" for p in polygons)
        sx, sy = tissue.level0_px_per_mask_px
        in_mask_px = [shapely.transform(p, lambda xy, sx=sx, sy=sy: xy / [sx, sy]) for p in polygons]
        np.testing.assert_array_equal(tissue_rasterised(in_mask_px, tissue.mask.shape), tissue.mask)
        distance = shapely.hausdorff_distance(
            shapely.union_all(in_mask_px).boundary, pixel_edge_outline(tissue.mask).boundary
        )
        assert distance <= 1.0, f"{slide}: outline {distance:.2f} mask px from the mask's contours"
    # the synthetic slide's tissue block has a glass hole: one annotation, with one interior ring
    pyr = [f for f in collections["pyr"]["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(pyr) == 1 and len(pyr[0]["geometry"]["coordinates"]) == 2


def test_geojson_detections_are_the_tiles_with_their_scores_and_phenotypes(cohort):
    collections = export_geojson(cohort)
    names = cohort["results"].phenotype_names()
    assert len(names) == 3 and all(n.startswith("phenotype_0") for n in names)
    for slide in ("cmu-a", "cmu-b", "pyr"):
        x, y, tissue, meta = formats.read_tile_table(cohort["files"][slide]["tiles"])
        side, width, height = meta["tile_level0_px"], meta["level0_width"], meta["level0_height"]
        _, _, scores = formats.read_tile_scores(cohort["root"] / "zeroshot/demo/tile_scores" / f"{slide}.parquet")
        _, _, phenotype, _ = formats.read_phenotype_assignments(
            cohort["root"] / "phenotypes/assignments" / f"{slide}.parquet"
        )
        detections = [f for f in collections[slide]["features"] if f["properties"]["objectType"] == "detection"]
        assert len(detections) == len(x) > 0
        best = cohort["calls"].loc[slide, "best"]
        top = np.asarray(CLASSES)[np.argmax(np.stack([scores[c] for c in CLASSES], axis=1), axis=1)]
        for i, feature in enumerate(detections):
            square = shapely.geometry.shape(feature["geometry"])
            assert square.is_valid and square.equals(shapely.box(x[i], y[i], x[i] + side, y[i] + side))
            assert square.bounds[0] >= 0 and square.bounds[1] >= 0
            assert square.bounds[2] <= width and square.bounds[3] <= height
            measurements = feature["properties"]["measurements"]
            for cls in CLASSES:
                assert measurements[f"demo score: {cls}"] == pytest.approx(float(scores[cls][i]), rel=1e-6, abs=1e-7)
            assert measurements["tissue fraction"] == pytest.approx(float(tissue[i]), rel=1e-6)
            assert measurements["phenotype"] == phenotype[i]
            assert feature["properties"]["name"] == names[phenotype[i]]
            classification = feature["properties"].get("classification")
            if top[i] == best:
                assert classification["name"] == best and len(classification["color"]) == 3
            else:
                assert classification is None
        assert (top == best).any()  # some tiles carry the call
        provenance = collections[slide]["histoclip"]
        assert provenance["weights_sha256"] == SHA and provenance["model"] == "tiny" and provenance["status"] == "ok"
        assert provenance["classified_by"] == {"prompt_set": "demo", "slide_best_class": best}
    index = pd.read_csv(cohort["root"] / "qupath/index/shard00000.tsv", sep="\t")
    assert index["slide_id"].tolist() == cohort["ids"]
    assert index.set_index("slide_id").loc["broken", "status"] == "error"


def test_geojson_of_a_failed_slide_and_of_a_model_without_a_text_tower(cohort):
    collections = export_geojson(cohort)
    assert collections["broken"]["features"] == []
    assert collections["broken"]["histoclip"]["status"] == "error"
    assert "Bogus marker" in collections["broken"]["histoclip"]["error"]
    image_only = ModelResults.of("uni", phenotype_dir=cohort["root"] / "phenotypes")
    collections = export_geojson(cohort, image_only, out="qupath-image-only")
    detections = [f for f in collections["cmu-a"]["features"] if f["properties"]["objectType"] == "detection"]
    assert detections and all(
        set(f["properties"]["measurements"]) == {"tissue fraction", "phenotype"} for f in detections
    )
    assert not any("classification" in f["properties"] for f in detections)
    assert collections["cmu-a"]["histoclip"]["classified_by"] is None


def test_geojson_refuses_tile_scores_of_other_tiles(cohort, tmp_path):
    root = cohort["root"]
    x, y, scores = formats.read_tile_scores(root / "zeroshot/demo/tile_scores/cmu-a.parquet")
    stale = tmp_path / "tile_scores"
    for slide in cohort["ids"]:
        (stale / f"{slide}.parquet").parent.mkdir(exist_ok=True)
        source = root / "zeroshot/demo/tile_scores" / f"{slide}.parquet"
        (stale / f"{slide}.parquet").write_bytes(source.read_bytes())
    matrix = np.stack(list(scores.values()), axis=1)
    formats.write_tile_scores(stale / "cmu-a.parquet", x[::-1], y[::-1], matrix, list(scores), {"slide_id": "cmu-a"})
    results = ModelResults.of("tiny", {"demo": stale}, {"demo": root / "zeroshot/demo/calls.tsv"}, root / "phenotypes")
    files = cohort["files"]["cmu-a"]
    with pytest.raises(InputError, match="cmu-a: lists 49 tiles that are not the tile file's 49 tiles") as error:
        qupath.export_slide_geojson(
            "cmu-a", files["tiles"], files["mask"], files["embeddings"], results, tmp_path / "out.geojson"
        )
    assert str(stale / "cmu-a.parquet") in str(error.value)
    assert not (tmp_path / "out.geojson").exists()


# --- AnnData


def test_slides_anndata_reads_back_with_the_sheet_calls_clusters_and_composition(cohort, tmp_path):
    import anndata

    root = cohort["root"]
    adata = h5ad.slides_anndata(
        root / "slides.tsv",
        root / "slides.parquet",
        cohort["results"],
        clusters=root / "clusters.tsv",
        clustering_summary=root / "clustering.json",
    )
    h5ad.write_h5ad(adata, tmp_path / "slides.h5ad")
    back = anndata.read_h5ad(tmp_path / "slides.h5ad")
    assert back.shape == (4, DIM) and back.X.dtype == np.float32
    assert back.obs_names.tolist() == cohort["ids"]
    _, embeddings = formats.read_slide_embeddings(root / "slides.parquet")
    np.testing.assert_array_equal(back.X, embeddings)  # NaN row for the failed slide
    assert np.isnan(back.X[3]).all() and back.obs.loc["broken", "n_tiles"] == 0
    obs = back.obs
    assert obs["patient_id"].tolist() == ["p1", "p2", "p3", "p4"]
    assert obs["age"].tolist()[:3] == [61.0, 70.0, 55.5] and np.isnan(obs.loc["broken", "age"])
    assert obs["split"].tolist() == ["test", "test", "train", "test"]
    assert obs["label"].tolist()[:3] == ["tumour", "stroma", "tumour"] and pd.isna(obs.loc["broken", "label"])
    calls = cohort["calls"]
    for slide in ("cmu-a", "cmu-b", "pyr"):
        assert obs.loc[slide, "demo_best"] == calls.loc[slide, "best"]
        assert obs.loc[slide, "demo_margin"] == pytest.approx(calls.loc[slide, "margin"])
        for cls in ("tumour", "stroma", "necrosis"):
            assert obs.loc[slide, f"demo_p_{cls}"] == pytest.approx(calls.loc[slide, f"p_{cls}"])
    assert obs.loc["broken", "demo_status"] == "error"
    clusters = pd.read_csv(root / "clusters.tsv", sep="\t", dtype={"slide_id": str}).set_index("slide_id")
    assert obs.loc[["cmu-a", "cmu-b", "pyr"], "cluster"].astype(int).tolist() == clusters["cluster"].iloc[:3].tolist()
    assert pd.isna(obs.loc["broken", "cluster"])
    np.testing.assert_allclose(back.obsm["X_pca"], clusters[["map_1", "map_2"]].to_numpy())
    assert back.uns["slide_map"]["method"] == "pca" and back.uns["slide_map"]["k"] == 2
    composition = formats.read_composition(root / "phenotypes/composition.tsv").set_index("slide_id")
    for column in ("phenotype_00", "phenotype_01", "phenotype_02"):
        np.testing.assert_allclose(obs[column].to_numpy(), composition[column].to_numpy())
    assert {f"fraction_{c}" for c in CLASSES} <= set(obs.columns)
    assert back.uns["histoclip"]["weights_sha256"] == SHA and back.uns["histoclip"]["model"] == "tiny"
    assert len(back.uns["phenotypes"]) == 3


def test_tile_anndata_reads_back_with_spatial_coordinates(cohort, tmp_path):
    import anndata

    root, files = cohort["root"], cohort["files"]
    rows = h5ad.export_tile_anndata_shard(
        ["pyr", "broken"],
        [files[s]["tiles"] for s in ("pyr", "broken")],
        [files[s]["embeddings"] for s in ("pyr", "broken")],
        cohort["results"],
        [tmp_path / "pyr.h5ad", tmp_path / "broken.h5ad"],
        tmp_path / "index.tsv",
    )
    assert [r["status"] for r in rows] == ["ok", "error"]
    back = anndata.read_h5ad(tmp_path / "pyr.h5ad")
    x, y, embeddings, _ = formats.read_tile_embeddings(files["pyr"]["embeddings"])
    assert back.shape == (len(x), DIM)
    np.testing.assert_array_equal(back.X, embeddings)
    np.testing.assert_array_equal(back.obsm["spatial"], np.column_stack([x, y]))
    np.testing.assert_array_equal(back.obs["x"], x)
    _, _, scores = formats.read_tile_scores(root / "zeroshot/demo/tile_scores/pyr.parquet")
    for cls in CLASSES:
        np.testing.assert_array_equal(back.obs[f"demo_score_{cls}"].to_numpy(), scores[cls])
    _, _, phenotype, _ = formats.read_phenotype_assignments(root / "phenotypes/assignments/pyr.parquet")
    np.testing.assert_array_equal(back.obs["phenotype_id"], phenotype)
    names = cohort["results"].phenotype_names()
    assert back.obs["phenotype"].tolist() == [names[p] for p in phenotype]
    assert back.uns["histoclip"]["tile_level0_px"] == 448 and back.uns["histoclip"]["slide_id"] == "pyr"
    assert anndata.read_h5ad(tmp_path / "broken.h5ad").shape == (0, DIM)


# --- CLAM / TRIDENT HDF5


def export_h5(cohort, tmp_path):
    files, ids = cohort["files"], cohort["ids"]
    outputs = [tmp_path / "h5" / f"{s}.h5" for s in ids]
    mil_h5.export_h5_shard(
        ids,
        [files[s]["tiles"] for s in ids],
        [files[s]["embeddings"] for s in ids],
        outputs,
        tmp_path / "h5/index/shard00000.tsv",
        "tiny",
    )
    return dict(zip(ids, outputs, strict=True))


def test_h5_reads_as_clams_feature_loader_does(cohort, tmp_path):
    """CLAM's Generic_MIL_Dataset with use_h5: ``features = f['features'][:]; coords = f['coords'][:]``."""
    outputs = export_h5(cohort, tmp_path)
    for slide in ("cmu-a", "pyr"):
        with h5py.File(outputs[slide], "r") as f:
            features, coords = f["features"][:], f["coords"][:]
            encoder = f["features"].attrs["encoder"]
            sha = f["features"].attrs["weights_sha256"]
        x, y, embeddings, _ = formats.read_tile_embeddings(cohort["files"][slide]["embeddings"])
        assert features.dtype == np.float32 and features.shape == (len(x), DIM)
        np.testing.assert_array_equal(features, embeddings)
        assert coords.dtype == np.int64 and coords.shape == (len(x), 2)
        np.testing.assert_array_equal(coords, np.column_stack([x, y]))
        assert encoder == "tiny" and sha == SHA
    with h5py.File(outputs["broken"], "r") as f:
        assert f["features"].shape == (0, DIM) and f["coords"].shape == (0, 2)
        assert f["coords"].attrs["status"] == "error"


@pytest.mark.parametrize("slide", ["cmu-a", "pyr"])
def test_h5_coordinates_cut_out_histoclips_tile_as_clam_and_trident_read_them(cohort, tmp_path, slide):
    """CLAM's Whole_Slide_Bag_FP reads ``wsi.read_region(coord, patch_level, (patch_size, patch_size))``; TRIDENT's
    read_coords + WSIPatcher reads round(patch_size × level0_magnification / target_magnification) level-0 pixels.
    Both must cut out the tile histoclip embedded: tile_level0_px at (x, y) of level 0."""
    outputs = export_h5(cohort, tmp_path)
    _, _, _, meta = formats.read_tile_table(cohort["files"][slide]["tiles"])
    with h5py.File(outputs[slide], "r") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
    side = meta["tile_level0_px"]
    # TRIDENT: its patcher's level-0 patch size from the file's attributes
    assert round(attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"]) == side
    assert attrs["patch_size_level0"] == side and attrs["name"] == slide
    assert (attrs["level0_width"], attrs["level0_height"]) == (meta["level0_width"], meta["level0_height"])
    path = cohort["root"] / "pyramid.tiff" if slide == "pyr" else None
    with openslide.OpenSlide(path or read_cohort_sheet(cohort["root"] / "slides.tsv")[0].path) as wsi:
        patch_level, patch_size = int(attrs["patch_level"]), int(attrs["patch_size"])
        assert patch_size * wsi.level_downsamples[patch_level] == side  # CLAM's region is the tile's
        for coord in coords[:: max(1, len(coords) // 5)]:
            patch = np.asarray(
                wsi.read_region(tuple(int(c) for c in coord), patch_level, (patch_size, patch_size)).convert("RGB")
            )
            assert patch.shape == (patch_size, patch_size, 3)
            if slide == "pyr":  # the ramp along x says where the patch came from
                x, y = int(coord[0]), int(coord[1])
                truth = pyramid_rgb()[y : y + side, x : x + side]
                assert np.abs(patch.astype(int) - truth).mean() < 6
    if slide == "pyr":  # a 40x slide without a 20x level: read at level 0, twice the tile's 224 px
        assert (patch_level, patch_size, attrs["tile_px"], attrs["target_mpp"]) == (0, 448, 224, 0.5)
        assert attrs["level0_magnification"] == pytest.approx(40.0) and attrs["target_magnification"] == pytest.approx(
            40.0
        )
    else:
        assert (patch_level, patch_size, attrs["tile_px"]) == (0, 224, 224)
