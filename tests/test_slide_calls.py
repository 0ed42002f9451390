"""Zero-shot calls over a cohort: the text-classifier file, tile scores, calls.tsv and evaluation outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from histoclip.config import default_config
from histoclip.demo import write_pyramid_tiff
from histoclip.embedding.embed import SlideJob, embed_shard
from histoclip.embedding.models import ModelSpec, load_model
from histoclip.formats import read_text_classifier
from histoclip.sheets import SlideRecord
from histoclip.store import read_metadata
from histoclip.tiling.grid import TilingParams, run_tiling
from histoclip.zeroshot.calls import CallSettings, call_cohort, write_text_classifier
from histoclip.zeroshot.prompts import load_prompt_set

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calls")
    model = load_model(ModelSpec("tiny", str(REPO / "config/models/tiny-vit.json"), seed=3), "cpu")
    records, files = [], []
    for i, (label, split) in enumerate([("adenocarcinoma", "train"), ("squamous", "test"), ("adenocarcinoma", "test")]):
        rng = np.random.default_rng(i)
        rgb = np.full((768, 768, 3), 240, np.uint8)
        rgb[128:640, 128:640] = rng.integers(40, 220, (512, 512, 3), dtype=np.uint8) // [1, 2, 1]
        slide = tmp / f"s{i}.tiff"
        write_pyramid_tiff(slide, rgb, mpp=0.5)
        tiles = tmp / "tiles" / f"s{i}.parquet"
        run_tiling(
            slide,
            f"s{i}",
            tiles,
            tmp / "qc" / f"s{i}.png",
            params=TilingParams.from_config(default_config({"tiling": {"tile_px": 64}})),
        )
        embed_shard([SlideJob.from_tile_file(tiles, tmp / "emb" / f"s{i}.parquet")], model, num_workers=0)
        records.append(SlideRecord(f"s{i}", f"P{i}", slide, None, label, {"split": split}))
        files.append(tmp / "emb" / f"s{i}.parquet")
    classifier_path = tmp / "zs" / "text_classifier.parquet"
    write_text_classifier(model, load_prompt_set(REPO / "config/prompts/demo.yaml"), classifier_path)
    return tmp, model, records, files, classifier_path


def test_text_classifier_file_round_trip(cohort):
    _, model, _, _, path = cohort
    classifier = read_text_classifier(path)
    assert classifier.classes[:2] == ["adenocarcinoma", "squamous"]
    assert classifier.called_classes == ["adenocarcinoma", "squamous"]
    np.testing.assert_allclose(np.linalg.norm(classifier.weights, axis=1), 1.0, atol=1e-6)
    meta = read_metadata(path)
    assert meta["prompt_set"] == "demo" and len(meta["prompts_sha256"]) == 64
    assert meta["weights_sha256"] == model.weights_sha256
    assert classifier.logit_scale == pytest.approx(model.logit_scale)


def test_calls_contract_and_evaluation_on_held_out_slides(cohort):
    tmp, _, records, files, path = cohort
    out = tmp / "zs"
    calls = call_cohort(
        records,
        files,
        read_text_classifier(path),
        out,
        CallSettings.from_config(default_config({"zeroshot": {"top_k": 5, "bootstrap": 50}})),
    )
    written = pd.read_csv(out / "calls.tsv", sep="\t", keep_default_na=False)
    assert list(written.columns[:6]) == ["slide_id", "call", "p_adenocarcinoma", "p_squamous", "margin", "abstain"]
    assert written["slide_id"].tolist() == ["s0", "s1", "s2"]
    probs = calls[["p_adenocarcinoma", "p_squamous"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(calls["margin"], np.abs(probs[:, 0] - probs[:, 1]))
    assert set(calls["call"]) <= {"adenocarcinoma", "squamous"} and not calls["abstain"].any()
    for record in records:
        scores = pq.read_table(out / "tile_scores" / f"{record.slide_id}.parquet")
        tiles = pq.read_table(tmp / "tiles" / f"{record.slide_id}.parquet")
        assert scores.num_rows == tiles.num_rows
        assert {"score_stroma", "score_necrosis"} <= set(scores.schema.names)  # background classes are scored
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["slides"] == ["s1", "s2"]  # the train-split slide is never evaluated
    assert (out / "confusion.tsv").exists()


def test_abstain_margin(cohort):
    tmp, _, records, files, path = cohort
    calls = call_cohort(
        records,
        files,
        read_text_classifier(path),
        tmp / "abstain",
        CallSettings.from_config(default_config({"zeroshot": {"abstain_margin": 1.0}})),
    )
    assert calls["abstain"].all() and (calls["call"] == "").all()
    assert set(calls["best"]) <= {"adenocarcinoma", "squamous"}


def test_embeddings_of_another_model_are_refused(cohort):
    tmp, _, records, files, _ = cohort
    other = load_model(ModelSpec("other", str(REPO / "config/models/tiny-vit.json"), seed=99), "cpu")
    classifier = write_text_classifier(other, load_prompt_set(REPO / "config/prompts/demo.yaml"), tmp / "o.parquet")
    with pytest.raises(ValueError, match="re-run the embedding step"):
        call_cohort(records, files, classifier, tmp / "other")
