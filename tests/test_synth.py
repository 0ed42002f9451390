"""Tests of the synthetic demo cohort: what a user of the demo would check before trusting it.

The default cohort (200 patients, 220 slides of 2048 px) is generated once per module (~25 s on two cores)
because the checks that matter (Cox recovery, class separability) are properties of that cohort, not of a toy one.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile

from histoclip.demo import (
    CLASS_MAP_DOWNSAMPLE,
    SUBTYPES,
    TISSUE_CLASSES,
    TRUE_COEFFICIENTS,
    DemoCohort,
    make_demo_cohort,
    read_class_map,
    tile_classes,
    write_class_map,
    write_large_slide,
    write_pyramid_tiff,
)

SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> DemoCohort:
    start = time.perf_counter()
    made = make_demo_cohort(tmp_path_factory.mktemp("demo"))
    print(f"default demo cohort generated in {time.perf_counter() - start:.1f} s")
    return made


@pytest.fixture(scope="module")
def sheet(cohort: DemoCohort) -> pd.DataFrame:
    return pd.read_csv(cohort.sheet, sep="\t")


@pytest.fixture(scope="module")
def clinical(cohort: DemoCohort) -> pd.DataFrame:
    return pd.read_csv(cohort.clinical, sep="\t")


@pytest.fixture(scope="module")
def captions(cohort: DemoCohort) -> pd.DataFrame:
    return pd.read_csv(cohort.captions, sep="\t")


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------- slides


def test_every_slide_opens_in_openslide_with_levels_and_mpp(cohort: DemoCohort, sheet: pd.DataFrame) -> None:
    for rel in sheet["path"]:
        path = cohort.sheet.parent / rel
        assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
        with openslide.OpenSlide(str(path)) as slide:
            assert slide.level_count == 3
            assert slide.dimensions == (2048, 2048)
            assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
            assert float(slide.properties["openslide.mpp-x"]) == 0.5
            assert float(slide.properties["openslide.mpp-y"]) == 0.5


def test_slide_pixels_match_the_class_map(cohort: DemoCohort, sheet: pd.DataFrame) -> None:
    """Glass is near white, tissue is not, and the class map says which is which."""
    slide_id = sheet["slide_id"].iloc[0]
    with openslide.OpenSlide(str(cohort.sheet.parent / sheet["path"].iloc[0])) as slide:
        thumb = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB"))
    label, downsample = read_class_map(cohort.class_maps / f"{slide_id}.png")
    assert downsample == CLASS_MAP_DOWNSAMPLE == 4  # the same grid as pyramid level 1
    assert thumb.shape[:2] == label.shape
    gray = thumb.mean(axis=2)
    background = label == TISSUE_CLASSES.index("background")
    assert np.median(gray[background]) > 235
    assert np.median(gray[~background]) < 215


def test_write_pyramid_tiff_without_mpp_has_no_mpp(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    path = tmp_path / "no-mpp.tiff"
    write_pyramid_tiff(path, rgb, mpp=None)
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert "openslide.mpp-x" not in slide.properties
        assert slide.level_count == 3
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE


def test_write_pyramid_tiff_layout_and_no_timestamp(tmp_path: Path) -> None:
    rgb = np.full((1000, 1300, 3), 200, np.uint8)  # not a multiple of the tile or of the downsamples
    path = tmp_path / "slide.tiff"
    write_pyramid_tiff(path, rgb, mpp=0.25, downsamples=(1, 4, 16))
    assert [p.name for p in tmp_path.iterdir()] == ["slide.tiff"]  # no temporary file left behind
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 3 and not tif.pages[0].subifds
        for i, page in enumerate(tif.pages):
            assert page.is_tiled and page.tilewidth == 256 and page.tilelength == 256
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.subfiletype == (1 if i else 0)
            assert "DateTime" not in page.tags
        assert [p.shape[:2] for p in tif.pages] == [(1000, 1300), (250, 325), (63, 82)]
    with openslide.OpenSlide(str(path)) as slide:
        assert float(slide.properties["openslide.mpp-x"]) == 0.25


def test_write_pyramid_tiff_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_pyramid_tiff(tmp_path / "x.tiff", np.zeros((64, 64), np.uint8), mpp=0.5)
    with pytest.raises(ValueError, match="downsamples"):
        write_pyramid_tiff(tmp_path / "x.tiff", np.zeros((64, 64, 3), np.uint8), mpp=0.5, downsamples=(2, 4))
    with pytest.raises(ValueError, match="mpp"):
        write_pyramid_tiff(tmp_path / "x.tiff", np.zeros((64, 64, 3), np.uint8), mpp=-1.0)
    assert not list(tmp_path.iterdir())


def test_write_large_slide_small_version(tmp_path: Path) -> None:
    path = tmp_path / "large.tiff"
    start = time.perf_counter()
    write_large_slide(path, level0_px=20_000, mpp=0.25, tissue_fraction=0.5, seed=3)
    elapsed = time.perf_counter() - start
    assert elapsed < 30
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_count == 4
        assert slide.level_dimensions == ((20000, 20000), (5000, 5000), (1250, 1250), (313, 313))
        assert float(slide.properties["openslide.mpp-x"]) == 0.25
        low = np.asarray(slide.read_region((0, 0), 3, slide.level_dimensions[3]).convert("RGB"))
        tissue = low.mean(axis=2) < 225
        assert 0.3 < tissue.mean() < 0.65
        # Level 0 agrees with the low level where there is tissue.
        ys, xs = np.nonzero(tissue[100:200, 100:200])
        y, x = (int(ys[0]) + 100) * 64, (int(xs[0]) + 100) * 64
        region = np.asarray(slide.read_region((x, y), 0, (64, 64)).convert("RGB"))
        assert region.mean() < 235


# ------------------------------------------------------------------------------------------ the tables


def test_sheet(cohort: DemoCohort, sheet: pd.DataFrame) -> None:
    assert list(sheet.columns) == ["slide_id", "patient_id", "path", "label", "split", "site"]
    assert sheet["slide_id"].is_unique
    assert all(SAFE_ID.fullmatch(s) for s in sheet["slide_id"])
    assert sheet["patient_id"].nunique() == 200 and len(sheet) == 220
    for rel in sheet["path"]:
        assert not Path(rel).is_absolute() and (cohort.sheet.parent / rel).is_file()
    assert set(sheet["label"]) == set(SUBTYPES)
    assert sheet.groupby("patient_id")["label"].nunique().eq(1).all()
    # Splits: both present, patient-disjoint, stratified by subtype, about train_fraction of patients.
    assert set(sheet["split"]) == {"train", "test"}
    assert sheet.groupby("patient_id")["split"].nunique().eq(1).all()
    patients = sheet.drop_duplicates("patient_id")
    assert (patients["split"] == "train").sum() == 76  # 37.5 % of each subtype's 100, rounded
    assert patients.groupby("label")["split"].nunique().eq(2).all()


def test_clinical(clinical: pd.DataFrame, sheet: pd.DataFrame, cohort: DemoCohort) -> None:
    assert {"patient_id", "time", "event", "age", "sex"} <= set(clinical.columns)
    assert clinical["patient_id"].is_unique
    assert set(clinical["patient_id"]) == set(sheet["patient_id"])
    assert (clinical["time"] > 0).all()
    assert set(clinical["event"]) <= {0, 1}
    assert 0.2 <= 1 - clinical["event"].mean() <= 0.4
    # Covariates agree with the sheet and with the truth measured on the class maps.
    labels = sheet.drop_duplicates("patient_id").set_index("patient_id")["label"]
    assert (clinical.set_index("patient_id")["subtype"] == labels.loc[clinical["patient_id"]]).all()
    assert (clinical["subtype_squamous"] == (clinical["subtype"] == "squamous")).all()
    truth = pd.read_csv(cohort.slide_truth, sep="\t")
    assert truth["necrosis_fraction"].between(0, 0.71).all()
    # right-skewed as in resections: most slides have a little necrosis, a tail has much
    assert truth["necrosis_fraction"].median() < 0.2 and (truth["necrosis_fraction"] > 0.35).mean() >= 0.05
    assert truth["necrosis_fraction"].max() - truth["necrosis_fraction"].min() > 0.2
    assert truth["tissue_fraction"].between(0.8, 0.97).all()  # a field of a resection: 85-95 % tissue (TISSUE_SHARE)


def test_coefficients_name_clinical_columns(cohort: DemoCohort, clinical: pd.DataFrame) -> None:
    coef = pd.read_csv(cohort.coefficients, sep="\t")
    assert list(coef.columns) == ["covariate", "coefficient", "description"]
    assert dict(zip(coef["covariate"], coef["coefficient"], strict=True)) == TRUE_COEFFICIENTS
    assert set(coef["covariate"]) <= set(clinical.columns)
    assert coef["description"].str.len().gt(20).all()


def _cox_fit(x: np.ndarray, time_: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cox partial likelihood (Breslow ties) by Newton-Raphson; returns (coefficients, standard errors)."""
    order = np.argsort(-time_, kind="stable")
    x, time_, event = x[order], time_[order], event[order]
    last = np.searchsorted(-time_, -time_, side="right") - 1  # risk set: everyone with time >= t
    died = event == 1
    beta = np.zeros(x.shape[1])
    for _ in range(50):
        w = np.exp(x @ beta)
        s0 = np.cumsum(w)[last[died]]
        s1 = np.cumsum(w[:, None] * x, axis=0)[last[died]]
        s2 = np.cumsum(w[:, None, None] * x[:, :, None] * x[:, None, :], axis=0)[last[died]]
        mean = s1 / s0[:, None]
        grad = (x[died] - mean).sum(axis=0)
        info = (s2 / s0[:, None, None] - mean[:, :, None] * mean[:, None, :]).sum(axis=0)
        step = np.linalg.solve(info, grad)
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    return beta, np.sqrt(np.diag(np.linalg.inv(info)))


def test_cox_model_recovers_true_coefficients(clinical: pd.DataFrame) -> None:
    names = list(TRUE_COEFFICIENTS)
    beta, se = _cox_fit(clinical[names].to_numpy(float), clinical["time"].to_numpy(float), clinical["event"].to_numpy())
    truth = np.array([TRUE_COEFFICIENTS[n] for n in names])
    assert (np.sign(beta) == np.sign(truth)).all(), dict(zip(names, beta, strict=True))
    assert (np.abs(beta - truth) < 1.96 * se).all(), dict(zip(names, zip(beta, se, strict=True), strict=True))


# ------------------------------------------------------------------------------- captions, class maps


def test_captions_refer_to_slides_and_agree_with_class_maps(
    cohort: DemoCohort, captions: pd.DataFrame, sheet: pd.DataFrame
) -> None:
    assert list(captions.columns) == ["slide_id", "x", "y", "tile_level0_px", "tissue_class", "caption"]
    assert set(captions["slide_id"]) <= set(sheet["slide_id"])
    assert set(captions["tissue_class"]) == set(TISSUE_CLASSES) - {"background"}
    assert (captions["tile_level0_px"] == 224).all()
    assert (captions["x"] % 224 == 0).all() and (captions["y"] % 224 == 0).all()
    assert captions["caption"].nunique() >= 6 * 8  # several templates × synonyms are in use
    centre_agrees = []
    for slide_id, rows in captions.groupby("slide_id"):
        path = cohort.class_maps / f"{slide_id}.png"
        label, ds = read_class_map(path)
        for x, y, name in zip(rows["x"], rows["y"], rows["tissue_class"], strict=True):
            block = label[y // ds : (y + 224) // ds, x // ds : (x + 224) // ds]
            assert (block == TISSUE_CLASSES.index(name)).mean() >= 0.9
        centre_agrees.append(tile_classes(path, rows["x"], rows["y"], 224) == rows["tissue_class"].to_numpy())
    assert np.concatenate(centre_agrees).mean() > 0.97


def test_tile_classes_reads_the_map(tmp_path: Path) -> None:
    label = np.zeros((64, 64), np.uint8)
    label[:, 32:] = TISSUE_CLASSES.index("stroma")
    path = tmp_path / "map.png"
    write_class_map(path, label)
    got = tile_classes(path, [0, 200, 10_000], [0, 0, 0], 16)
    assert list(got) == ["background", "stroma", "background"]
    assert tile_classes(path, 200, 0, 16).shape == () and str(tile_classes(path, 200, 0, 16)) == "stroma"


def _tile_features(rgb: np.ndarray) -> np.ndarray:
    """Colour balance plus two cheap texture statistics: a stand-in for what a CNN would pick up."""
    rgb = rgb.astype(np.float32)
    gray = rgb.mean(axis=2)
    grad = np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean()
    return np.array(
        [*rgb.reshape(-1, 3).mean(axis=0), gray.std(), (gray < 120).mean() * 100, (gray > 225).mean() * 100, grad]
    )


def test_tissue_classes_are_separable_at_224_and_112_px(
    cohort: DemoCohort, captions: pd.DataFrame, sheet: pd.DataFrame
) -> None:
    """Nearest-centroid on held-out slides (test split) from centroids of the train split."""
    split = sheet.set_index("slide_id")["split"]
    features: dict[int, list[np.ndarray]] = {224: [], 112: []}
    for slide_id, rows in captions.groupby("slide_id"):
        path = cohort.sheet.parent / sheet.set_index("slide_id").loc[slide_id, "path"]
        with openslide.OpenSlide(str(path)) as slide:
            for x, y in zip(rows["x"], rows["y"], strict=True):
                tile = slide.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB")
                features[224].append(_tile_features(np.asarray(tile)))
                features[112].append(_tile_features(np.asarray(tile.reduce(2))))
    classes = captions["tissue_class"].to_numpy()
    train = captions["slide_id"].map(split).eq("train").to_numpy()
    for size, rows in features.items():
        f = np.array(rows)
        f = (f - f[train].mean(axis=0)) / f[train].std(axis=0)
        names = sorted(set(classes))
        centroids = np.array([f[train & (classes == c)].mean(axis=0) for c in names])
        predicted = np.array(names)[np.argmin(((f[~train, None] - centroids) ** 2).sum(axis=2), axis=1)]
        recall = [np.mean(predicted[classes[~train] == c] == c) for c in names]
        assert np.mean(recall) >= 0.9, (size, dict(zip(names, recall, strict=True)))


# ------------------------------------------------------------------------------------------ determinism


def test_byte_identical_for_a_seed_whatever_the_workers(tmp_path: Path) -> None:
    kwargs = {"n_patients": 6, "extra_slides": 1, "slide_px": 768}
    a = make_demo_cohort(tmp_path / "a", seed=7, workers=1, **kwargs)
    b = make_demo_cohort(tmp_path / "b", seed=7, workers=2, **kwargs)
    c = make_demo_cohort(tmp_path / "c", seed=8, workers=2, **kwargs)
    digests = _digests(a.root)
    assert len(digests) == 6 + 2 * 7  # five TSVs + cohort.json, then a slide and a class map per slide
    assert digests == _digests(b.root)
    assert digests != _digests(c.root)
    assert not [p for p in a.root.rglob("*") if p.name.endswith(".tmp")]


def test_site_effect_shifts_the_stain_of_the_second_site_only(tmp_path: Path) -> None:
    """Half the patients per site; with demo.site_effect the site-B slides are darker (denser stain) and the
    site-A slides, like everything else the generator draws, are byte for byte those of a cohort without it."""
    kwargs = {"n_patients": 4, "extra_slides": 0, "slide_px": 512, "workers": 1}
    plain = make_demo_cohort(tmp_path / "plain", **kwargs)
    shifted = make_demo_cohort(tmp_path / "shifted", site_effect=0.3, **kwargs)
    sheet = pd.read_csv(shifted.sheet, sep="\t")
    assert sheet["site"].value_counts().to_dict() == {"site-A": 2, "site-B": 2}
    assert pd.read_csv(plain.sheet, sep="\t").equals(sheet)
    assert plain.clinical.read_bytes() == shifted.clinical.read_bytes()
    for row in sheet.itertuples():
        a, b = (tifffile.imread(cohort.root / row.path, level=0) for cohort in (plain, shifted))
        if row.site == "site-A":
            assert np.array_equal(a, b), row.slide_id
        else:
            tissue = a.mean(axis=2) < 200
            assert b[tissue].mean() < a[tissue].mean() - 10, row.slide_id  # denser stain: darker tissue
    with pytest.raises(ValueError, match="site_effect"):
        make_demo_cohort(tmp_path / "bad", site_effect=2.0)


def test_rejects_unusable_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="slide_px"):
        make_demo_cohort(tmp_path, slide_px=1000)
    with pytest.raises(ValueError, match="n_patients"):
        make_demo_cohort(tmp_path, n_patients=1)


def test_sample_tiles_look_like_tissue(cohort: DemoCohort, captions: pd.DataFrame, sheet: pd.DataFrame) -> None:
    """Nuclei (dark, haematoxylin-blue) where there should be many, and hardly any where there should not."""
    paths = sheet.set_index("slide_id")["path"]
    dark: dict[str, float] = {}
    for name, rows in captions.groupby("tissue_class"):
        values = []
        for slide_id, x, y in rows[["slide_id", "x", "y"]].head(20).itertuples(index=False):
            with openslide.OpenSlide(str(cohort.sheet.parent / paths[slide_id])) as slide:
                rgb = np.asarray(slide.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB"), np.float32)
            nuclear = (rgb.mean(axis=2) < 130) & (rgb[..., 2] > rgb[..., 1])  # dark and blue over green
            values.append(nuclear.mean())
        dark[name] = float(np.mean(values))
    assert dark["lymphocytes"] > max(dark["stroma"], dark["fat"], dark["necrosis"]) * 3
    assert dark["fat"] < 0.01
