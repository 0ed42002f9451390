"""Figures: the numbers behind them (against scikit-learn), their files, sizes and determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from histoclip.config import default_config
from histoclip.figures import cohort_qc_figure, roc_points, zeroshot_confusion_figure, zeroshot_roc_figure
from histoclip.plots import FigureStyle, class_colours, new_figure, save_figure


@pytest.fixture
def calls():
    rng = np.random.default_rng(3)
    labels = np.array(["luad", "lusc"] * 20)
    p_lusc = np.clip((labels == "lusc") * 0.35 + rng.uniform(0.1, 0.65, labels.size), 0, 1)
    call = np.where(p_lusc > 0.5, "lusc", "luad").astype(object)
    call[[8, 12]] = ""  # two abstentions among the held-out slides
    split = np.array(["test"] * labels.size, dtype=object)
    split[:6] = "train"
    return pd.DataFrame(
        {
            "slide_id": [f"s{i}" for i in range(labels.size)],
            "call": call,
            "p_luad": 1 - p_lusc,
            "p_lusc": p_lusc,
            "margin": np.abs(1 - 2 * p_lusc),
            "abstain": call == "",
            "best": np.where(p_lusc > 0.5, "lusc", "luad"),
            "n_tiles": 100,
            "status": "ok",
            "label": labels,
            "split": split,
        }
    )


def test_roc_points_match_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b", "c"], 60)
    probs = rng.dirichlet(np.ones(3), 60)
    probs[labels == "b", 1] += 0.3
    points = roc_points(labels, probs, ["a", "b", "c"])
    for index, cls in enumerate("abc"):
        mine = points[points["class"] == cls]
        fpr, tpr, _ = roc_curve(labels == cls, probs[:, index], drop_intermediate=False)
        assert mine["fpr"].to_numpy() == pytest.approx(fpr)
        assert mine["tpr"].to_numpy() == pytest.approx(tpr)
        assert mine["auc"].iloc[0] == pytest.approx(roc_auc_score(labels == cls, probs[:, index]))


def test_roc_needs_both_positives_and_negatives():
    with pytest.raises(ValueError, match="same label"):
        roc_points(["a", "a"], np.array([[0.6, 0.4], [0.7, 0.3]]), ["a", "b"])


def test_confusion_figure_counts_held_out_slides_and_abstentions(calls, tmp_path):
    style = FigureStyle.from_config(default_config())
    _, data = zeroshot_confusion_figure(calls, style)
    held_out = calls[calls["split"] != "train"]
    answered = held_out[held_out["call"] != ""]
    expected = confusion_matrix(answered["label"], answered["call"], labels=["luad", "lusc"])
    assert data[["luad", "lusc"]].to_numpy().tolist() == expected.tolist()
    assert data["abstained"].sum() == (held_out["call"] == "").sum() == 2
    assert data[["luad", "lusc", "abstained"]].to_numpy().sum() == len(held_out) == 34


def test_roc_figure_auc_is_scikit_learns_on_held_out_slides(calls):
    _, points = zeroshot_roc_figure(calls, FigureStyle.from_config(default_config()))
    held_out = calls[calls["split"] != "train"]
    auc = points.loc[points["class"] == "lusc", "auc"].iloc[0]
    assert auc == pytest.approx(roc_auc_score(held_out["label"] == "lusc", held_out["p_lusc"]))


def test_figures_without_labels_say_so(calls):
    with pytest.raises(ValueError, match="no label column"):
        zeroshot_confusion_figure(calls.drop(columns="label"), FigureStyle.from_config(default_config()))


def test_cohort_qc_figure_data_sorted_with_failures():
    cohort = pd.DataFrame(
        {
            "slide_id": ["a", "b", "c"],
            "patient_id": ["p", "p", "q"],
            "status": ["ok", "failed", "ok"],
            "n_tiles": [10, "", 30],
            "tissue_area_mm2": [1.5, "", 4.0],
            "level0_mpp": [0.5, "", 0.25],
            "mpp_source": ["openslide-metadata", "", "sheet"],
        }
    )
    _, data = cohort_qc_figure(cohort, FigureStyle.from_config(default_config()))
    assert data["slide_id"].tolist() == ["c", "a", "b"]
    assert data["n_tiles"].tolist() == [30, 10, 0]
    assert data["mpp_source"].tolist() == ["sheet", "openslide-metadata", "none (failed first)"]


def test_a_failed_slide_keeps_the_mpp_its_metadata_had(tmp_path):
    """Recorded failures carry what was read before the failure: the cohort table (and its QC figure) shows the
    mpp and its source for a slide whose tiles are damaged or that has no tissue, and none for a text file."""
    from bad_slides import blank_slide, corrupt_tiles_slide, text_file

    from histoclip.formats import read_tile_metadata
    from histoclip.tiling.grid import run_tiling

    metas = {}
    for name, make in (("damaged", corrupt_tiles_slide), ("blank", blank_slide), ("text", text_file)):
        path = make(tmp_path / f"{name}.{'svs' if name == 'text' else 'tiff'}")
        tiles = tmp_path / f"{name}.parquet"
        run_tiling(path, name, tiles, tmp_path / f"{name}.png", on_slide_error="record")
        metas[name] = read_tile_metadata(tiles)
    assert {name: meta["status"] for name, meta in metas.items()} == dict.fromkeys(metas, "error")
    for name in ("damaged", "blank"):
        assert metas[name]["level0_mpp"] == pytest.approx(0.5) and metas[name]["mpp_source"] == "openslide-metadata"
        assert metas[name]["reader"] == "openslide" and metas[name]["n_tiles"] == 0
    assert "level0_mpp" not in metas["text"] and "not an image" in metas["text"]["error"]


def test_save_figure_writes_each_format_with_source_data_and_the_styles_size(tmp_path):
    style = FigureStyle.from_config(
        default_config({"figures": {"width_in": 3.0, "height_in": 2.0, "dpi": 100, "formats": ["pdf", "png", "svg"]}})
    )
    with style.context():
        figure = new_figure(style)
        figure.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    data = pd.DataFrame({"x": [0, 1], "y": [1, 0]})
    written = save_figure(figure, tmp_path / "line", style, data=data)
    assert sorted(p.name for p in written) == ["line.pdf", "line.png", "line.svg", "line.tsv"]
    assert Image.open(tmp_path / "line.png").size == (300, 200)
    assert pd.read_csv(tmp_path / "line.tsv", sep="\t").equals(data)
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_report_copy_of_a_tissue_image_figure_is_a_small_jpeg_within_report_px(shared_data, tmp_path):
    """A figure of tissue (a real slide region) gets a JPEG copy for the HTML report no larger than
    figures.report_px on its longer side and far smaller than its print-resolution PNG, which is unchanged."""
    import openslide

    from histoclip.plots import REPORT_COPY

    style = FigureStyle.from_config(
        default_config(
            {"figures": {"width_in": 9.0, "height_in": 5.0, "dpi": 200, "formats": ["png"], "report_px": 800}}
        )
    )
    with openslide.OpenSlide(shared_data / "svs/CMU-1-Small-Region.svs") as slide:
        region = np.asarray(slide.read_region((0, 0), 0, (1200, 700)).convert("RGB"))
    with style.context():
        figure = new_figure(style)
        figure.add_subplot(1, 1, 1).imshow(region)
    written = save_figure(figure, tmp_path / "tissue", style, report_copy=True)
    assert sorted(p.name for p in written) == ["tissue.png", f"tissue.{REPORT_COPY}"]
    png, jpeg = Image.open(tmp_path / "tissue.png"), Image.open(tmp_path / f"tissue.{REPORT_COPY}")
    assert png.size == (1800, 1000) and jpeg.format == "JPEG" and jpeg.mode == "RGB"
    assert max(jpeg.size) <= 800 and jpeg.size[0] / jpeg.size[1] == pytest.approx(1.8, rel=0.01)
    assert (tmp_path / f"tissue.{REPORT_COPY}").stat().st_size * 5 < (tmp_path / "tissue.png").stat().st_size


def test_same_figure_twice_gives_identical_files(tmp_path):
    style = FigureStyle.from_config(default_config())

    def draw(stem):
        with style.context():
            figure = new_figure(style)
            figure.add_subplot(1, 1, 1).bar(["a", "b"], [3, 5])
        save_figure(figure, tmp_path / stem, style)

    draw("one")
    draw("two")
    for fmt in ("pdf", "png"):
        assert (tmp_path / f"one.{fmt}").read_bytes() == (tmp_path / f"two.{fmt}").read_bytes()


def test_font_size_comes_from_the_style():
    style = FigureStyle.from_config(default_config({"figures": {"font_size": 13}}))
    with style.context():
        ax = new_figure(style).add_subplot(1, 1, 1)
        label = ax.set_xlabel("x")
    assert label.get_fontsize() == 13


def test_class_colours_are_stable_and_distinct():
    colours = class_colours(["a", "b", "c"])
    assert colours == class_colours(["a", "b", "c"]) and len(set(colours.values())) == 3
