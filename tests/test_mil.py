"""MIL on embedding files with a known answer: which class each slide is, and which of its tiles say so."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pandas as pd
import pytest
from mil_cohorts import signal_cohort
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from histoclip.bags import BagReader
from histoclip.config import default_config
from histoclip.errors import InputError
from histoclip.formats import read_attention, read_calls
from histoclip.mil.comparison import compare_methods
from histoclip.mil.evidence import attention_percentiles, evidence_slides
from histoclip.mil.folds import patient_folds, patient_strata, validation_split
from histoclip.mil.saved import load_mil_model
from histoclip.mil.settings import MilSettings, MilTask
from histoclip.mil.stage import MilOutputs, deploy_cohort, train_task

TASK = MilTask("subtype", "label")


def settings(**overrides):
    mil = {"max_epochs": 25, "threads": 1, "device": "cpu"} | overrides
    return MilSettings.from_config(default_config({"mil": mil}))


def outputs(root, name):
    return MilOutputs(
        root / f"{name}.tsv",
        root / f"{name}.json",
        root / f"{name}_training.tsv",
        root / f"{name}.safetensors",
        root / f"{name}_attention",
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return signal_cohort(tmp_path_factory.mktemp("mil"))


@pytest.fixture(scope="module")
def abmil(cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("abmil")
    sheet, manifest, _ = cohort
    out = outputs(root, "abmil")
    evaluation = train_task("abmil", TASK, sheet, manifest, settings(), out)
    return out, evaluation


def test_abmil_calls_every_slide_out_of_fold_with_the_calls_contract(cohort, abmil):
    _, _, truth = cohort
    out, evaluation = abmil
    calls = read_calls(out.calls)
    assert list(calls.columns[:6]) == ["slide_id", "call", "p_a", "p_b", "margin", "abstain"]
    assert {"best", "n_tiles", "status", "label", "split", "fold", "patient_id"} <= set(calls.columns)
    assert sorted(calls["slide_id"]) == sorted(truth["slide_id"])
    assert np.allclose(calls[["p_a", "p_b"]].sum(axis=1), 1.0)
    # no patient in two folds, every fold holds both classes, 5 folds
    assert calls.groupby("patient_id")["fold"].nunique().eq(1).all()
    assert calls.groupby("fold")["label"].nunique().eq(2).all() and calls["fold"].nunique() == 5
    # the evaluation is the zero-shot code's, on every slide, and agrees with scikit-learn
    assert evaluation["n_scored"] == len(truth)
    assert evaluation["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(calls["label"], calls["call"]))
    assert evaluation["macro_auc"] == pytest.approx(roc_auc_score(calls["label"] == "b", calls["p_b"]))
    assert evaluation["balanced_accuracy"] >= 0.9  # measured 0.97-1.0: key tiles in 10 % of a bag
    low, high = evaluation["ci"]["balanced_accuracy"]["low"], evaluation["ci"]["balanced_accuracy"]["high"]
    assert low <= evaluation["balanced_accuracy"] <= high
    assert json.loads(out.evaluation.read_text())["held_out"]["n_scored"] == (calls["split"] == "test").sum()


def test_abmil_attends_to_the_tiles_that_carry_the_class(cohort, abmil):
    _, _, truth = cohort
    out, _ = abmil
    mass, top = [], []
    for row in truth.itertuples():
        x, y, attention, meta = read_attention(out.attention / f"{row.slide_id}.parquet")
        assert meta["slide_id"] == row.slide_id and attention.sum() == pytest.approx(1.0, abs=1e-5)
        mass.append(attention[sorted(row.keys)].sum())
        top.append(int(np.argmax(attention)) in row.keys)
    # the key tiles are 10 % of each bag: uniform attention would give them 0.1 of the weight
    assert np.mean(mass) >= 0.6 and np.mean(top) >= 0.75  # measured 0.81 and 0.84


def test_attention_beats_mean_pooling_when_few_tiles_carry_the_class(cohort, abmil, tmp_path):
    sheet, manifest, _ = cohort
    mean = train_task("mean", TASK, sheet, manifest, settings(), outputs(tmp_path, "mean"))
    assert mean["balanced_accuracy"] < abmil[1]["balanced_accuracy"]
    _, _, attention, _ = read_attention(tmp_path / "mean_attention" / "p00-s0.parquet")
    assert np.allclose(attention, attention[0])  # mean pooling: every tile weighs the same


def test_training_is_deterministic_on_cpu(cohort, tmp_path):
    sheet, manifest, _ = cohort
    quick = settings(max_epochs=3)
    train_task("abmil", TASK, sheet, manifest, quick, outputs(tmp_path, "one"))
    # the second run reads every bag from disk every epoch (no bag cache): the same calls, to the byte
    train_task("abmil", TASK, sheet, manifest, dataclasses.replace(quick, bag_cache_mb=0), outputs(tmp_path, "two"))
    assert (tmp_path / "one.tsv").read_bytes() == (tmp_path / "two.tsv").read_bytes()
    other = dataclasses.replace(quick, seed=1)
    train_task("abmil", TASK, sheet, manifest, other, outputs(tmp_path, "three"))
    assert (tmp_path / "one.tsv").read_bytes() != (tmp_path / "three.tsv").read_bytes()


def test_saved_model_has_provenance_and_deploys_on_a_new_cohort(abmil, tmp_path):
    out, evaluation = abmil
    saved = load_mil_model(out.model)
    info = saved.info
    assert info["task"] == "subtype" and info["classes"] == ["a", "b"] and info["mil_model"] == "abmil"
    assert info["embedding"]["weights_sha256"] == "ab" * 32 and info["dim"] == 16 and len(saved.states) == 5
    assert info["cross_validated"]["balanced_accuracy"] == pytest.approx(evaluation["balanced_accuracy"])
    assert sorted(sum(info["fold_slides"].values(), [])) == sorted(evaluation["slides"])
    # a new cohort from the same "model": the ensemble of the fold models calls it
    sheet, manifest, truth = signal_cohort(tmp_path / "new", n_patients=10, seed=5)
    scored = deploy_cohort(out.model, sheet, manifest, tmp_path / "calls.tsv", attention=tmp_path / "att")
    calls = read_calls(tmp_path / "calls.tsv")
    assert sorted(calls["slide_id"]) == sorted(truth["slide_id"]) and set(calls["fold"]) == {"ensemble"}
    assert scored["balanced_accuracy"] >= 0.9
    assert (tmp_path / "att" / f"{truth['slide_id'].iloc[0]}.parquet").exists()
    # the same from the command line
    from histoclip.cli import main

    assert (
        main(
            [
                "deploy",
                str(out.model),
                "--sheet",
                str(sheet),
                "--embeddings",
                str(manifest),
                "--out",
                str(tmp_path / "cli.tsv"),
            ]
        )
        == 0
    )
    assert (tmp_path / "cli.tsv").read_bytes() == (tmp_path / "calls.tsv").read_bytes()
    # embeddings of other weights are refused, naming both
    sheet, manifest, _ = signal_cohort(tmp_path / "other", n_patients=4, sha="cd" * 32)
    with pytest.raises(InputError, match="embedded with weights cdcdcdcdcdcd.*trained on embeddings of synthetic"):
        deploy_cohort(out.model, sheet, manifest, tmp_path / "other.tsv")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(InputError, match="junk.safetensors: cannot be read as a MIL model file"):
        load_mil_model(tmp_path / "junk.safetensors")


def test_patient_folds_are_stratified_seeded_and_never_split_a_patient(caplog):
    labels = pd.Series(["a"] * 7 + ["b"] * 3, index=[f"P{i}" for i in range(10)])
    folds = patient_folds(labels, 5, seed=0, where="sheet")
    assert folds.max() == 2  # capped at the 3 patients of b
    assert "3 patients: using 3 folds" in caplog.text
    for fold in range(3):
        members = labels[folds == fold]
        assert (members == "b").sum() == 1 and (members == "a").sum() in (2, 3)
    assert folds.equals(patient_folds(labels, 5, seed=0, where="sheet"))
    assert not folds.equals(patient_folds(labels, 5, seed=1, where="sheet"))
    held = validation_split(labels, 0.2, seed=0, fold=0)
    assert held[labels == "a"].sum() == 1 and held[labels == "b"].sum() == 1
    with pytest.raises(InputError, match=r"1 patient\(s\) have slides of different classes, e.g. P1"):
        patient_strata(["P1", "P1", "P2"], ["a", "b", "a"], where="sheet")
    with pytest.raises(InputError, match="class 'b' has 1 patient"):
        patient_folds(pd.Series(["a", "a", "b"], index=["1", "2", "3"]), 5, seed=0, where="sheet")


def test_bags_are_read_one_ahead_of_the_model(cohort):
    _, manifest, truth = cohort
    from histoclip.formats import embedding_paths

    paths = dict(zip(truth["slide_id"], embedding_paths(manifest), strict=True))
    reads: list[str] = []

    class Counting(BagReader):
        def read(self, slide_id):
            reads.append(slide_id)
            return super().read(slide_id)

    ids = truth["slide_id"].tolist()
    for i, bag in enumerate(Counting(paths).iterate(ids)):
        assert bag.slide_id == ids[i]
        assert len(reads) <= i + 2  # this bag and at most the next: never the cohort
    assert reads == ids


def test_bag_cache_reads_a_cohort_that_fits_once_and_the_rest_every_epoch(cohort, monkeypatch):
    """Epochs after the first decode no file that fits in mil.bag_cache_mb; with a cache of half the cohort, the
    other half is read every epoch, and every bag is the same as read from its file."""
    import histoclip.bags as bags_module
    from histoclip.formats import embedding_paths, read_tile_embeddings

    _, manifest, truth = cohort
    ids = truth["slide_id"].tolist()
    paths = dict(zip(ids, embedding_paths(manifest), strict=True))
    decoded: list[str] = []

    def counting(path):
        decoded.append(path)
        return read_tile_embeddings(path)

    monkeypatch.setattr(bags_module.formats, "read_tile_embeddings", counting)
    sizes = {s: sum(a.nbytes for a in read_tile_embeddings(p)[:3]) for s, p in paths.items()}
    everything = BagReader(paths, cache_bytes=sum(sizes.values()))
    for epoch in range(3):
        for bag in everything.iterate(list(reversed(ids)) if epoch % 2 else ids):
            np.testing.assert_array_equal(bag.features, read_tile_embeddings(paths[bag.slide_id])[2])
    assert sorted(decoded) == sorted(paths.values())  # each file once, over three epochs
    decoded.clear()
    half = sum(sizes[s] for s in ids[: len(ids) // 2])
    partial = BagReader(paths, cache_bytes=half)
    for _ in range(3):
        assert [bag.slide_id for bag in partial.iterate(ids)] == ids
    assert len(decoded) == len(ids) // 2 + 3 * (len(ids) - len(ids) // 2)


def test_evidence_slides_take_each_class_best_call_then_the_worst_errors():
    calls = pd.DataFrame(
        {
            "slide_id": ["s1", "s2", "s3", "s4", "s5"],
            "call": ["a", "a", "b", "a", ""],
            "p_a": [0.9, 0.6, 0.2, 0.95, np.nan],
            "p_b": [0.1, 0.4, 0.8, 0.05, np.nan],
            "label": ["a", "a", "b", "b", "a"],
        }
    )
    assert evidence_slides(calls, ["a", "b"], 3) == ["s1", "s3", "s4"]
    assert evidence_slides(calls, ["a", "b"], 10) == ["s1", "s3", "s4", "s2"]
    assert evidence_slides(calls, ["a", "b"], 0) == []
    assert attention_percentiles(np.array([0.1, 0.5, 0.2, 0.2])).tolist() == pytest.approx([0, 1, 0.5, 0.5])


def test_comparison_scores_every_method_on_the_same_held_out_slides(caplog, tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    labels = np.array(["a", "b"] * (n // 2))
    split = np.where(np.arange(n) < 10, "train", "test")
    p_b = np.where(labels == "b", 0.7, 0.3) + rng.normal(0, 0.25, n)
    zeroshot = pd.DataFrame(
        {
            "slide_id": [f"s{i}" for i in range(n)],
            "call": np.where(p_b > 0.5, "b", "a"),
            "p_a": 1 - p_b,
            "p_b": p_b,
            "best": np.where(p_b > 0.5, "b", "a"),
            "n_tiles": 10,
            "label": labels,
            "split": split,
        }
    )
    mil = zeroshot.assign(call=labels, p_a=(labels == "a") * 1.0, p_b=(labels == "b") * 1.0)
    fewshot = pd.DataFrame(
        {
            "method": "prototype",
            "k": [1, 1, 1, 2, 2, 2],
            "draw": [0, 1, 2] * 2,
            "balanced_accuracy": [0.5, 0.6, 0.7, 0.7, 0.8, 0.9],
            "n_test": 30,
        }
    )
    table, facts = compare_methods(zeroshot, fewshot, {"abmil": mil}, n_bootstrap=200)
    assert table["method"].tolist() == ["zeroshot", "fewshot_prototype", "fewshot_prototype", "mil_abmil"]
    assert len(facts["held_out_slides"]) == 30 and not set(facts["held_out_slides"]) & {f"s{i}" for i in range(10)}
    held = zeroshot.iloc[10:]
    row = table.set_index("method").loc["zeroshot"]
    assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(held["label"], held["best"]))
    assert row["lower_95"] <= row["balanced_accuracy"] <= row["upper_95"] and row["n_slides"] == 30
    assert table.set_index("method").loc["mil_abmil", "balanced_accuracy"] == 1.0
    k2 = table[(table["method"] == "fewshot_prototype") & (table["k"] == 2)].iloc[0]
    assert k2["balanced_accuracy"] == pytest.approx(0.8) and k2["interval"] == "spread over 3 draws"
    from histoclip.mil.comparison import plot_comparison
    from histoclip.plots import FigureStyle

    written = plot_comparison(
        table, tmp_path / "comparison", FigureStyle.from_config(default_config()), chance=0.5, title="t"
    )
    assert sorted(p.suffix for p in written) == [".pdf", ".png", ".tsv"] and all(p.stat().st_size for p in written)
    with pytest.raises(InputError, match=r"MIL task's classes \['a', 'c'\] are not the prompt set's"):
        compare_methods(zeroshot, fewshot, {"abmil": mil.rename(columns={"p_b": "p_c"})})
    with caplog.at_level(logging.WARNING):
        compare_methods(zeroshot, fewshot.assign(n_test=29), {"abmil": mil}, n_bootstrap=10)
    assert "few-shot was scored on [29] held-out slides, zero-shot and MIL on 30" in caplog.text
