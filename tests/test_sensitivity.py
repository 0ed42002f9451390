"""Prompt sensitivity: the cached classifier equals the zero-shot text classifier, blocked pooling equals
pooling subset by subset, and every subset's balanced accuracy equals a direct re-run of the zero-shot recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from histoclip.config import default_config
from histoclip.embedding.models import ModelSpec, load_model
from histoclip.plots import FigureStyle
from histoclip.zeroshot.classifier import call_slide, pool, text_classifier, tile_scores
from histoclip.zeroshot.evaluation import prompt_sensitivity
from histoclip.zeroshot.prompts import load_prompt_set
from histoclip.zeroshot.sensitivity import (
    PromptCache,
    SensitivitySettings,
    cohort_prompt_sensitivity,
    plot_prompt_sensitivity,
    pooled_scores,
    read_prompt_sensitivity,
    run_prompt_sensitivity,
    write_prompt_sensitivity,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return load_model(ModelSpec("tiny", str(REPO / "config/models/tiny-vit.json"), seed=3), "cpu")


@pytest.fixture(scope="module")
def prompt_set():
    return load_prompt_set(REPO / "config/prompts/demo.yaml")


def test_cached_classifier_equals_the_zero_shot_text_classifier(model, prompt_set):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return model.encode_texts(texts)

    cache = PromptCache(encode)
    weights = cache.classifier(prompt_set)
    classes, reference = text_classifier(lambda t: model.encode_texts(t), prompt_set)
    rows = [classes.index(c) for c in prompt_set.called_classes]
    np.testing.assert_allclose(weights, reference[rows], atol=1e-6)
    subset = prompt_set.subset(np.random.default_rng(0), 0.5, 0.5)
    sub_classes, sub_reference = text_classifier(lambda t: model.encode_texts(t), subset)
    np.testing.assert_allclose(cache.classifier(subset), sub_reference[: len(prompt_set.called_classes)], atol=1e-6)
    encoded = [t for batch in calls for t in batch]
    assert len(encoded) == len(set(encoded)) == 2 * 4 * 6  # each called prompt once, the subset's from the cache


def test_blocked_pooling_equals_pooling_each_subset():
    rng = np.random.default_rng(0)
    tiles = rng.normal(size=(37, 8))
    weights = rng.normal(size=(5, 3, 8))
    weights /= np.linalg.norm(weights, axis=2, keepdims=True)
    for method in ("topk", "mean", "lse"):
        settings = SensitivitySettings.from_config(
            default_config({"zeroshot": {"pooling": method, "top_k": 4, "lse_temperature": 7.0}})
        )
        blocked = pooled_scores(tiles, weights, settings, max_values=37 * 3 * 2)  # 2 subsets per block
        expected = [pool(tile_scores(tiles, w), method, k=4, temperature=7.0) for w in weights]
        np.testing.assert_allclose(blocked, expected, atol=1e-12)


def test_each_subset_scores_as_a_direct_zero_shot_rerun(model, prompt_set, tmp_path):
    rng = np.random.default_rng(4)
    # Tiles near the full classifier's class rows with heavy noise, so that wording matters for some slides.
    _, full = text_classifier(lambda t: model.encode_texts(t), prompt_set)
    labels = ["adenocarcinoma", "squamous"] * 6
    slides = []
    tiles_of = {}
    for i, label in enumerate(labels):
        row = full[prompt_set.called_classes.index(label)]
        tiles = row + 0.35 * rng.normal(size=(20, row.size)) / np.sqrt(row.size) * 4
        tiles_of[f"s{i}"] = tiles
        slides.append((f"s{i}", label, lambda t=tiles: t))
    settings = SensitivitySettings.from_config(
        default_config(
            {"seed": 1, "zeroshot": {"top_k": 5, "n_subsets": 6, "template_fraction": 0.34, "synonym_fraction": 0.25}}
        )
    )
    summary, table = run_prompt_sensitivity(prompt_set, model.encode_texts, model.logit_scale, slides, settings)

    # the same subsets as prompt_sensitivity draws, each re-run through the plain zero-shot functions
    draws = []
    prompt_sensitivity(lambda ps: draws.append(ps), prompt_set, n_subsets=6, template_fraction=0.34,
                       synonym_fraction=0.25, seed=1)  # fmt: skip
    expected = []
    for subset in draws:
        classes, weights = text_classifier(lambda t: model.encode_texts(t), subset)
        called = subset.called_classes
        rows = [classes.index(c) for c in called]
        predicted = []
        for slide_id, _, _ in slides:
            pooled = pool(tile_scores(tiles_of[slide_id], weights[rows]), "topk", k=5)
            predicted.append(call_slide(pooled, called, model.logit_scale, 0.0).call)
        expected.append(balanced_accuracy_score(labels, predicted))
    assert table["subset"].tolist() == [str(i) for i in range(1, 7)] + ["full"]
    np.testing.assert_allclose(table["balanced_accuracy"], expected, atol=1e-12)
    assert table["prompts_sha256"].tolist() == [d.sha256 for d in draws]
    assert summary["full"] == pytest.approx(expected[-1])
    assert summary["values"] == pytest.approx(expected[:-1])
    assert summary["median"] == pytest.approx(np.median(expected[:-1]))
    assert summary["n_prompts_encoded"] == 2 * 4 * 6 and summary["slides"] == [s[0] for s in slides]
    assert table["n_prompts"].iloc[-1] == 48 and (table["n_prompts"].iloc[:-1] == 2 * 1 * 2).all()

    written = plot_prompt_sensitivity(
        table, tmp_path / "sens", FigureStyle.from_config(default_config({"figures": {"formats": ["png"]}})), chance=0.5
    )
    assert [p.name for p in written] == ["sens.png", "sens.tsv"]
    data = pd.read_csv(tmp_path / "sens.tsv", sep="\t", dtype={"subset": str})
    np.testing.assert_allclose(data["balanced_accuracy"], table["balanced_accuracy"], atol=1e-6)


def test_no_slides_or_one_class_is_refused(model, prompt_set):
    with pytest.raises(ValueError, match="no held-out"):
        run_prompt_sensitivity(prompt_set, model.encode_texts, model.logit_scale, [])


def test_cohort_run_reproduces_the_zero_shot_rule(model, prompt_set, tmp_path):
    """On the zero-shot rule's own outputs, the full prompt set scores exactly what the rule's calls score."""
    import pyarrow as pa

    from histoclip import store
    from histoclip.errors import InputError
    from histoclip.formats import read_text_classifier
    from histoclip.sheets import SlideRecord
    from histoclip.zeroshot.calls import CallSettings, call_cohort, write_text_classifier

    classifier_path = tmp_path / "zs" / "text_classifier.parquet"
    stored = write_text_classifier(model, prompt_set, classifier_path)
    rng = np.random.default_rng(7)
    records, files = [], {}
    for i, label in enumerate(["adenocarcinoma", "squamous"] * 5):
        row = stored.weights[stored.classes.index(label)]
        tiles = (row + 1.2 * rng.normal(size=(15, row.size)) / np.sqrt(row.size)).astype(np.float32)
        path = tmp_path / "emb" / f"s{i}.parquet"
        table = pa.table(
            {
                "x": pa.array(np.arange(15), pa.int64()),
                "y": pa.array(np.zeros(15), pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(tiles.reshape(-1)), row.size),
            }
        )
        store.write_table_atomic(path, table, model.provenance())
        split = "train" if i < 2 else "test"
        records.append(SlideRecord(f"s{i}", f"P{i}", path, None, label, {"split": split}))
        files[f"s{i}"] = path
    settings = SensitivitySettings.from_config(default_config({"seed": 2, "zeroshot": {"top_k": 5, "n_subsets": 5}}))
    call_settings = CallSettings.from_config(default_config({"zeroshot": {"top_k": 5, "bootstrap": 0}}))
    call_cohort(records, list(files.values()), read_text_classifier(classifier_path), tmp_path / "zs", call_settings)
    reference = read_text_classifier(classifier_path)
    summary, table = cohort_prompt_sensitivity(
        prompt_set,
        PromptCache(model.encode_texts),
        model.logit_scale,
        model.weights_sha256,
        tmp_path / "zs" / "calls.tsv",
        files,
        (reference.classes, reference.weights),
        settings,
    )
    evaluation = json.loads((tmp_path / "zs" / "evaluation.json").read_text())
    assert summary["slides"] == evaluation["slides"] == [f"s{i}" for i in range(2, 10)]  # train slides left out
    assert summary["full"] == pytest.approx(evaluation["balanced_accuracy"], abs=1e-12)
    assert summary["calls_balanced_accuracy"] == pytest.approx(evaluation["balanced_accuracy"], abs=1e-12)
    assert summary["classifier_max_abs_difference"] < 1e-6
    write_prompt_sensitivity(summary, table, tmp_path / "s.json", tmp_path / "s.tsv")
    again, again_table = read_prompt_sensitivity(tmp_path / "s.json", tmp_path / "s.tsv")
    assert again["values"] == pytest.approx(summary["values"]) and again_table["subset"].tolist()[-1] == "full"
    with pytest.raises(InputError, match="re-run the embedding step"):
        cohort_prompt_sensitivity(
            prompt_set, PromptCache(model.encode_texts), model.logit_scale, "cd" * 32, tmp_path / "zs" / "calls.tsv",
            files, None, settings,
        )  # fmt: skip
