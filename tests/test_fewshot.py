"""Few-shot on slide embeddings: prototype by hand, the probe and the scores against scikit-learn, the held-out
set against the zero-shot evaluation's, skipped k, and the rule's outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from histoclip import store
from histoclip.cohort.aggregation import aggregate_slides
from histoclip.config import default_config
from histoclip.errors import InputError
from histoclip.plots import FigureStyle
from histoclip.zeroshot.evaluation import evaluated_slides
from histoclip.zeroshot.fewshot import (
    FewShotSettings,
    fewshot_curve,
    plot_fewshot,
    prototype_predict,
    prototypes,
    run_fewshot,
)

CLASSES = ["LUAD", "LUSC"]


def write_embeddings(path, tiles):
    """An embedding file as the embedding rule writes it (x, y, embedding + model provenance)."""
    tiles = np.asarray(tiles, dtype=np.float32).reshape(-1, 4)
    table = pa.table(
        {
            "x": pa.array(np.arange(len(tiles)), pa.int64()),
            "y": pa.array(np.zeros(len(tiles)), pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(tiles.reshape(-1)), 4),
        }
    )
    store.write_table_atomic(path, table, {"model_name": "m", "weights_sha256": "ab" * 32, "dim": 4})
    return path


def clustered(rng, n_per_class, centres, spread=0.6):
    """Unit vectors around one centre per class (rows of ``centres``, in CLASSES order)."""
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, len(c))) for c in centres])
    y = np.repeat(CLASSES, n_per_class)
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_prototype_classifier_by_hand():
    x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.0, 3.0]])
    y = ["A", "A", "B", "B"]
    protos = prototypes(x, y, ["A", "B"])
    np.testing.assert_allclose(protos[0], np.array([1.8, 0.6]) / np.linalg.norm([1.8, 0.6]))
    np.testing.assert_allclose(protos[1], [0.0, 1.0])  # (0,3) counts as a unit vector, not three
    assert prototype_predict(protos, np.array([[1.0, 0.2], [0.3, 1.0], [1.0, 1.0]]), ["A", "B"]) == ["A", "B", "A"]


def test_scores_and_probe_agree_with_sklearn():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 8))
    pool_x, pool_y = clustered(rng, 10, centres, spread=1.5)
    test_x, test_y = clustered(rng, 15, centres, spread=1.5)
    settings = FewShotSettings.from_config(
        default_config({"seed": 3, "fewshot": {"shots": [1, 3, 5], "draws": 4, "probe_c": 0.7}})
    )
    ids = [f"s{i}" for i in range(len(pool_y))]
    results, notes = fewshot_curve(pool_x, pool_y, test_x, test_y, CLASSES, settings, ids)
    assert notes == {}
    assert len(results) == 3 * 4 * 2 and set(results["n_test"]) == {30}
    for row in results.itertuples():
        picks = [ids.index(s) for s in row.shots.split(",")]
        assert len(set(picks)) == 2 * row.k
        assert sorted(pool_y[picks].tolist()) == sorted(CLASSES * row.k)  # k distinct shots per class
        if row.method == "logistic":
            probe = LogisticRegression(C=0.7, max_iter=1000).fit(pool_x[picks], pool_y[picks])
            expected = balanced_accuracy_score(test_y, probe.predict(test_x))
        else:
            centres = np.stack([pool_x[picks][pool_y[picks] == c].mean(axis=0) for c in CLASSES])
            centres /= np.linalg.norm(centres, axis=1, keepdims=True)
            expected = balanced_accuracy_score(test_y, np.array(CLASSES)[np.argmax(test_x @ centres.T, axis=1)])
        assert row.balanced_accuracy == pytest.approx(expected, abs=1e-12)
    # the same seed draws the same shots whatever other k are listed; both methods share each draw
    again, _ = fewshot_curve(
        pool_x,
        pool_y,
        test_x,
        test_y,
        CLASSES,
        FewShotSettings.from_config(default_config({"seed": 3, "fewshot": {"shots": [3], "draws": 4, "probe_c": 0.7}})),
        ids,
    )
    pd.testing.assert_frame_equal(
        again.reset_index(drop=True), results[results["k"] == 3].reset_index(drop=True), check_dtype=False
    )
    shots = results.pivot_table(index=["k", "draw"], columns="method", values="shots", aggfunc="first")
    assert (shots["logistic"] == shots["prototype"]).all()


def test_separable_classes_are_learnt_and_random_labels_are_not():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(2, 16))
    pool_x, pool_y = clustered(rng, 8, centres, spread=0.3)
    test_x, test_y = clustered(rng, 20, centres, spread=0.3)
    results, _ = fewshot_curve(
        pool_x,
        pool_y,
        test_x,
        test_y,
        CLASSES,
        FewShotSettings.from_config(default_config({"fewshot": {"shots": [4], "draws": 5}})),
    )
    assert results["balanced_accuracy"].min() == 1.0
    shuffled = np.random.default_rng(2).permutation(test_y)
    results, _ = fewshot_curve(
        pool_x,
        pool_y,
        test_x,
        shuffled,
        CLASSES,
        FewShotSettings.from_config(default_config({"fewshot": {"shots": [4], "draws": 5}})),
    )
    assert 0.3 < results["balanced_accuracy"].median() < 0.7


def test_k_beyond_the_pool_is_skipped_with_a_note():
    rng = np.random.default_rng(2)
    pool_x, pool_y = clustered(rng, 3, rng.normal(size=(2, 8)))
    pool_x, pool_y = pool_x[:-1], pool_y[:-1]  # LUSC: 2 slides
    results, notes = fewshot_curve(
        pool_x,
        pool_y,
        pool_x,
        pool_y,
        CLASSES,
        FewShotSettings.from_config(default_config({"fewshot": {"shots": [1, 2, 4], "draws": 2}})),
    )
    assert sorted(results["k"].unique()) == [1, 2]
    assert list(notes) == [4] and "'LUSC' has 2 training slide(s)" in notes[4]


def test_evaluated_slides_agrees_with_the_zero_shot_evaluation():
    from histoclip.zeroshot import calls as slide_calls

    calls = pd.DataFrame(
        {
            "slide_id": list("abcdefg"),
            "label": ["LUAD", "LUSC", "LUAD", "", "other", "LUSC", "LUAD"],
            "split": ["train", "test", "TRAIN", "test", "test", "test", "val"],
            "n_tiles": [5, 5, 5, 5, 5, 0, 5],
        }
    )
    ours = evaluated_slides(calls, CLASSES)["slide_id"].tolist()
    assert ours == slide_calls.evaluated_slides(calls, CLASSES)["slide_id"].tolist() == ["b", "g"]


@pytest.fixture()
def cohort(tmp_path):
    """Slide table + calls.tsv of 20 slides: 8 train (4 per class), 10 held out, 1 unlabelled, 1 without tiles."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(2, 4))
    ids, patients, files, rows = [], [], [], []
    labels = ["LUAD", "LUSC"] * 10
    for i, label in enumerate(labels):
        slide = f"s{i:02d}"
        split = "train" if i < 8 else "test"
        label = "" if i == 18 else label
        n = 0 if i == 19 else 6
        centre = centres[CLASSES.index(labels[i])]
        tiles = centre + 0.8 * rng.normal(size=(n, 4))
        files.append(write_embeddings(tmp_path / "emb" / f"{slide}.parquet", tiles))
        ids.append(slide)
        patients.append(f"P{i}")
        best = labels[i] if i % 5 else CLASSES[1 - CLASSES.index(labels[i])]  # zero-shot wrong on every 5th
        rows.append(
            {"slide_id": slide, "call": best, "p_LUAD": 0.5, "p_LUSC": 0.5, "margin": 0.0, "abstain": False}
            | {"best": best, "n_tiles": n, "status": "ok", "label": label, "split": split}
        )
    aggregate_slides(ids, patients, files, tmp_path / "slides.parquet")
    calls = pd.DataFrame(rows)
    store.write_text_atomic(tmp_path / "calls.tsv", calls.to_csv(sep="\t", index=False))
    return tmp_path, calls


def test_run_fewshot_uses_the_zero_shot_held_out_slides(cohort):
    tmp, calls = cohort
    settings = FewShotSettings.from_config(default_config({"fewshot": {"shots": [1, 2, 4, 8], "draws": 3}}))
    results, summary, facts = run_fewshot(tmp / "slides.parquet", tmp / "calls.tsv", settings)
    held_out = evaluated_slides(calls, CLASSES)
    assert facts["test_slides"] == held_out["slide_id"].tolist()
    assert facts["n_test"] == 10 and facts["n_pool"] == {"LUAD": 4, "LUSC": 4}
    assert facts["patients_in_both_splits"] == []
    train = set(calls.loc[calls["split"] == "train", "slide_id"])
    assert all(set(s.split(",")) <= train for s in results["shots"])
    zs = summary[summary["method"] == "zeroshot"].iloc[0]
    assert zs["median"] == pytest.approx(balanced_accuracy_score(held_out["label"], held_out["best"]))
    assert zs["n_test"] == 10
    skipped = summary[summary["method"] == "skipped"]
    assert skipped["k"].tolist() == [8]
    for (method, k), group in results.groupby(["method", "k"]):
        row = summary[(summary["method"] == method) & (summary["k"] == k)].iloc[0]
        assert row["median"] == pytest.approx(group["balanced_accuracy"].median())
        assert (row["min"], row["max"]) == (group["balanced_accuracy"].min(), group["balanced_accuracy"].max())
    written = plot_fewshot(
        summary,
        tmp / "fig" / "curve",
        FigureStyle.from_config(default_config({"figures": {"formats": ["png"]}})),
        chance=0.5,
    )
    assert [p.name for p in written] == ["curve.png", "curve.tsv"]
    figure_data = pd.read_csv(tmp / "fig" / "curve.tsv", sep="\t")
    assert "skipped" not in set(figure_data["method"]) and "zeroshot" in set(figure_data["method"])


def test_unlabelled_cohort_is_refused(cohort):
    tmp, calls = cohort
    store.write_text_atomic(tmp / "nolabel.tsv", calls.drop(columns=["label"]).to_csv(sep="\t", index=False))
    with pytest.raises(InputError, match="add `label`"):
        run_fewshot(tmp / "slides.parquet", tmp / "nolabel.tsv", FewShotSettings.from_config(default_config()))
    store.write_text_atomic(tmp / "notrain.tsv", calls.assign(split="test").to_csv(sep="\t", index=False))
    with pytest.raises(InputError, match="split = train"):
        run_fewshot(tmp / "slides.parquet", tmp / "notrain.tsv", FewShotSettings.from_config(default_config()))


def test_patient_in_both_splits_is_warned_about(cohort, caplog):
    import logging

    tmp, calls = cohort
    ids = calls["slide_id"].tolist()
    patients = ["P0" if s in ("s00", "s08") else f"P{i}" for i, s in enumerate(ids)]
    files = [tmp / "emb" / f"{s}.parquet" for s in ids]
    aggregate_slides(ids, patients, files, tmp / "shared.parquet")
    with caplog.at_level(logging.WARNING, logger="histoclip.zeroshot.fewshot"):
        _, _, facts = run_fewshot(
            tmp / "shared.parquet",
            tmp / "calls.tsv",
            FewShotSettings.from_config(default_config({"fewshot": {"shots": [1], "draws": 1}})),
        )
    assert facts["patients_in_both_splits"] == ["P0"] and "split the sheet by patient" in caplog.text


def test_run_fewshot_without_calls_reads_the_sheet_labels(tmp_path):
    """A model without a text tower: labels, split and classes from the cohort sheet, the same held-out rule
    (labelled, with tiles, not train), two well-separated classes are told apart, and no zero-shot row."""
    rng = np.random.default_rng(11)
    centres = np.eye(4)[:2] * 5
    ids, patients, files, rows = [], [], [], []
    for i in range(16):
        slide, label = f"t{i:02d}", CLASSES[i % 2]
        n = 0 if i == 15 else 5  # held out but without tiles: not evaluated
        tiles = centres[i % 2] + 0.3 * rng.normal(size=(n, 4))
        files.append(write_embeddings(tmp_path / "emb" / f"{slide}.parquet", tiles))
        ids.append(slide)
        patients.append(f"P{i}")
        label = "" if i == 14 else label
        rows.append(f"{slide}\tP{i}\t{slide}.svs\t{label}\t{'train' if i < 8 else 'test'}\n")
    aggregate_slides(ids, patients, files, tmp_path / "slides.parquet")
    (tmp_path / "slides.tsv").write_text("slide_id\tpatient_id\tpath\tlabel\tsplit\n" + "".join(rows))
    settings = FewShotSettings.from_config(default_config({"fewshot": {"shots": [1, 2, 8], "draws": 3}}))
    results, summary, facts = run_fewshot(tmp_path / "slides.parquet", None, settings, sheet=tmp_path / "slides.tsv")
    assert facts["classes"] == sorted(CLASSES) and facts["zeroshot_balanced_accuracy"] is None
    assert facts["test_slides"] == [f"t{i:02d}" for i in range(8, 14)]
    assert facts["n_pool"] == {"LUAD": 4, "LUSC": 4}
    assert (results["balanced_accuracy"] >= 0.99).all()
    assert set(summary["method"]) == {"prototype", "logistic", "skipped"}
    assert summary.loc[summary["method"] == "skipped", "k"].tolist() == [8]
    written = plot_fewshot(
        summary, tmp_path / "fig" / "curve", FigureStyle.from_config(default_config({"figures": {"formats": ["png"]}}))
    )
    assert "zeroshot" not in set(pd.read_csv(written[-1], sep="\t")["method"])
    (tmp_path / "nolabel.tsv").write_text("slide_id\tpatient_id\tpath\n" + "".join(f"{s}\tP\tx.svs\n" for s in ids))
    with pytest.raises(InputError, match="add `label`"):
        run_fewshot(tmp_path / "slides.parquet", None, settings, sheet=tmp_path / "nolabel.tsv")
