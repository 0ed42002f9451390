"""Slide–report alignment (histoclip.report_alignment) on small synthetic embeddings, and the demo's reports.

The synthetic cohort: tiles are unit vectors in a 16-d space made of a subtype direction, a necrosis direction
and noise; a slide's necrosis share sets how many of its tiles lean on the necrosis direction. A report is the
text-side vector of its slide's facts, rotated by a fixed random rotation that the aligner must learn to undo.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from histoclip import formats
from histoclip.config import default_config
from histoclip.demo.reports import write_demo_reports
from histoclip.errors import InputError
from histoclip.report_alignment import pipeline
from histoclip.report_alignment.model import SlideReportAligner
from histoclip.report_alignment.reports import embed_reports, read_reports, split_report
from histoclip.report_alignment.retrieval import retrieval_metrics
from histoclip.report_alignment.training import (
    AlignmentSettings,
    contrastive_loss,
    load_aligner,
    save_aligner,
    split_validation,
    train_aligner,
)
from histoclip.sheets import read_cohort_sheet

DIM = 16


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def synthetic_cohort(n_slides: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """(bags by slide, report vectors by slide, subtypes) for slides s000, s001, …"""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]
    subtype_dirs, necrosis_dir = basis[:2], basis[2]
    rotation = np.linalg.qr(np.eye(DIM) + 0.3 * rng.normal(size=(DIM, DIM)))[0]
    bags, reports, subtypes = {}, {}, []
    for i in range(n_slides):
        subtype, necrosis = i % 2, rng.uniform(0.0, 0.6)
        n = int(rng.integers(40, 80))
        necrotic = rng.random(n) < necrosis
        tiles = np.where(necrotic[:, None], necrosis_dir, subtype_dirs[subtype]) + 0.35 * rng.normal(size=(n, DIM))
        bags[f"s{i:03d}"] = _unit(tiles).astype(np.float32)
        truth = subtype_dirs[subtype] + 2.0 * necrosis * necrosis_dir
        reports[f"s{i:03d}"] = _unit(_unit(truth) @ rotation + 0.05 * rng.normal(size=DIM))
        subtypes.append(("adeno", "squamous")[subtype])
    return bags, reports, subtypes


def settings(**changes) -> AlignmentSettings:
    base = AlignmentSettings.from_config(default_config())
    return dataclasses.replace(base, **changes)


def bag_reader(bags: dict[str, np.ndarray]):
    return lambda slide: (np.arange(len(bags[slide])), np.zeros(len(bags[slide])), bags[slide])


def test_split_report_gives_sentences_and_bounds_chunk_length():
    text = "Sections show adenocarcinoma. Necrosis is focal; margins clear.\nBlocks: 4. " + "word " * 30
    chunks = split_report(text, max_chunk_chars=40)
    assert chunks[:4] == ["Sections show adenocarcinoma.", "Necrosis is focal;", "margins clear.", "Blocks: 4."]
    assert all(len(c) <= 40 for c in chunks) and " ".join(chunks).split() == text.split()
    assert split_report("One. Two.  Three!", max_chunk_chars=100) == ["One.", "Two.", "Three!"]


def test_report_embedding_is_the_renormalised_mean_of_its_chunks():
    vectors = {"A.": [1.0, 0.0], "B.": [0.0, 2.0], "C.": [3.0, 4.0]}
    ids, n_chunks, pooled = embed_reports(
        lambda texts: np.array([vectors[t] for t in texts]), {"r1": "A. B.", "r2": "C."}, max_chunk_chars=20
    )
    assert ids == ["r1", "r2"] and n_chunks == [2, 1]
    np.testing.assert_allclose(pooled, [[2**-0.5, 2**-0.5], [0.6, 0.8]])


def test_bad_reports_tables_are_named_with_the_fix(tmp_path):
    table = tmp_path / "reports.tsv"
    table.write_text("slide\treport\na\tSome text.\n")
    with pytest.raises(InputError, match=r"reports.tsv: the reports table needs a `report` column and a `slide_id`"):
        read_reports(table)
    table.write_text("patient_id\treport\np1\tText.\np1\tMore.\n")
    with pytest.raises(InputError, match="patient_id listed more than once: p1 .*one report per patient_id"):
        read_reports(table)
    table.write_text("slide_id\treport\na\t \n")
    with pytest.raises(InputError, match=r"line 2 \(slide_id 'a'\): empty report"):
        read_reports(table)


def test_retrieval_metrics_on_a_known_similarity_matrix():
    # reports r0..r3 against slides in the order of their reports; r2's own slide ranks 3rd, r3's 2nd
    similarity = np.array(
        [[0.9, 0.1, 0.0, 0.0], [0.0, 0.8, 0.1, 0.0], [0.5, 0.4, 0.3, 0.0], [0.0, 0.0, 0.9, 0.5]], dtype=float
    )
    result = retrieval_metrics(similarity, ["r0", "r1", "r2", "r3"], ["r0", "r1", "r2", "r3"], ks=[1, 2])
    r2s = result["report_to_slide"]
    assert r2s["ranks"] == [1, 1, 3, 2]
    assert r2s["recall_at"] == {"1": 0.5, "2": 0.75} and r2s["median_rank"] == 1.5
    assert r2s["chance_recall_at"] == {"1": 0.25, "2": 0.5} and r2s["chance_median_rank"] == 2.5
    assert result["slide_to_report"]["ranks"] == [1, 1, 2, 1]  # slide 2 is closer to r3 than to r2


def test_patient_report_shared_by_two_slides_counts_both_as_matches():
    # two slides of patient p1 match p1's report equally well: the loss is at its floor (the entropy of the
    # soft targets, ln 2 for each of p1's two slides), not pushed up as if one of them were a wrong match
    vectors, scale = torch.eye(3)[[0, 0, 1]], torch.tensor(50.0)
    loss = contrastive_loss(vectors, vectors, ["p1", "p1", "p2"], scale)
    assert float(loss) == pytest.approx(2 / 3 * np.log(2), abs=1e-4)
    worse = contrastive_loss(vectors, torch.eye(3)[[0, 2, 1]], ["p1", "p1", "p2"], scale)
    assert float(worse) > float(loss) + 1
    # retrieval: p1's report finds one of its two slides first (rank 1), as chance would more often too
    ranks = retrieval_metrics(np.array([[0.2, 0.9, 0.1], [0.3, 0.0, 0.2]]), ["p1", "p2"], ["p1", "p1", "p2"], ks=[1])
    assert ranks["report_to_slide"]["ranks"] == [1, 2]
    assert ranks["report_to_slide"]["chance_recall_at"]["1"] == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_validation_split_keeps_patients_whole_and_is_seeded():
    slides = [f"s{i}" for i in range(12)]
    patients = [f"p{i // 2}" for i in range(12)]
    fit, val = split_validation(slides, patients, 0.25, seed=3)
    assert (fit, val) == split_validation(slides, patients, 0.25, seed=3)
    patient_of = dict(zip(slides, patients, strict=True))
    assert len(val) == 4 and not {patient_of[s] for s in fit} & {patient_of[s] for s in val}
    with pytest.raises(InputError, match="only 2 patient"):
        split_validation(["a", "b"], ["p1", "p2"], 0.25, seed=0)


def test_aligner_learns_the_pairing_on_held_out_synthetic_slides_and_is_deterministic():
    bags, reports, _ = synthetic_cohort(60)
    slides = list(bags)
    train_slides, held = slides[:40], slides[40:]
    config = settings(epochs=150, patience=25, batch_size=16, learning_rate=0.01)
    torch.set_num_threads(1)
    result = train_aligner(bag_reader(bags), train_slides, train_slides, {s: s for s in slides}, reports, config)
    again = train_aligner(bag_reader(bags), train_slides, train_slides, {s: s for s in slides}, reports, config)
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key
    assert set(result.train_slides) | set(result.validation_slides) == set(train_slides)

    def recall_at_5(model) -> float:
        with torch.no_grad():
            s = torch.stack([model.slide(torch.from_numpy(bags[x]))[0] for x in held]).numpy()
            r = model.text(torch.from_numpy(np.stack([reports[x] for x in held]).astype(np.float32))).numpy()
        return retrieval_metrics(r @ s.T, held, held, ks=[5])["report_to_slide"]["recall_at"]["5"]

    chance = 5 / len(held)
    untrained = recall_at_5(SlideReportAligner(DIM, 4))  # the raw space: reports are rotated away from slides
    assert untrained < 3 * chance <= recall_at_5(result.model)  # measured 0.0 and 1.0, chance 0.25
    assert (
        result.best_epoch > 0
        and result.history[result.best_epoch]["validation_loss"] < result.history[0]["validation_loss"]
    )


def test_saved_aligner_loads_back_with_its_provenance(tmp_path):
    bags, reports, _ = synthetic_cohort(12)
    slides = list(bags)
    result = train_aligner(
        bag_reader(bags), slides, slides, {s: s for s in slides}, reports, settings(epochs=3, batch_size=4)
    )
    save_aligner(tmp_path / "a.safetensors", result.model, {"train_slides": result.train_slides})
    model, provenance = load_aligner(tmp_path / "a.safetensors")
    assert provenance == {"train_slides": result.train_slides}
    bag = torch.from_numpy(bags["s000"])
    assert torch.equal(model.slide(bag)[0], result.model.slide(bag)[0])


def write_cohort(tmp_path, n_slides: int = 16):
    """A cohort on disk: sheet (train/test split, one patient with two slides), embedding files, reports."""
    bags, reports, subtypes = synthetic_cohort(n_slides)
    rows, manifest = [], []
    for i, (slide, bag) in enumerate(bags.items()):
        path = tmp_path / "embeddings" / f"{slide}.parquet"
        meta = {"slide_id": slide, "weights_sha256": "f" * 64}
        x, y = np.arange(len(bag)) * 224, np.zeros(len(bag), np.int64)
        writer = formats.EmbeddingFileWriter(path, x, y, DIM, "float32", meta, row_group_rows=64)
        writer.add(bag)
        writer.commit(slide)
        patient = "p000" if i < 2 else f"p{i:03d}"
        rows.append((slide, patient, f"{slide}.svs", subtypes[i], "train" if i < 10 else "test"))
        manifest.append(str(path))
        (tmp_path / f"{slide}.svs").write_bytes(b"")
    sheet = pd.DataFrame(rows, columns=["slide_id", "patient_id", "path", "label", "split"])
    sheet.to_csv(tmp_path / "slides.tsv", sep="\t", index=False)
    formats.write_embedding_manifest(tmp_path / "embeddings.tsv", list(bags), manifest)
    pd.DataFrame({"slide_id": list(bags), "report": [f"Report of {s}." for s in bags]}).to_csv(
        tmp_path / "reports.tsv", sep="\t", index=False
    )
    formats.write_report_embeddings(
        tmp_path / "reports.parquet", list(reports), [1] * len(reports), np.stack(list(reports.values())), {}
    )
    return read_cohort_sheet(tmp_path / "slides.tsv")


def test_no_held_out_slide_or_report_is_seen_in_training(tmp_path):
    records = write_cohort(tmp_path)
    held = {r.slide_id for r, _ in pipeline.held_out(records, tmp_path / "reports.tsv")}
    assert held == {f"s{i:03d}" for i in range(10, 16)}
    provenance = pipeline.train(
        records, tmp_path / "reports.tsv", tmp_path / "reports.parquet", tmp_path / "embeddings.tsv",
        settings(epochs=5, batch_size=4), tmp_path / "aligner.safetensors", tmp_path / "training.tsv",
    )  # fmt: skip
    seen = set(provenance["train_slides"]) | set(provenance["validation_slides"])
    assert seen == {f"s{i:03d}" for i in range(10)} and not seen & held
    assert not (set(provenance["train_reports"]) | set(provenance["validation_reports"])) & held
    # s000 and s001 are one patient's: on one side of the validation split
    assert ({"s000", "s001"} <= set(provenance["train_slides"])) or (
        {"s000", "s001"} <= set(provenance["validation_slides"])
    )
    # a held-out slide's embedding file is never opened: an unreadable one does not disturb training
    (tmp_path / "embeddings" / "s012.parquet").write_bytes(b"not parquet")
    again = pipeline.train(
        records, tmp_path / "reports.tsv", tmp_path / "reports.parquet", tmp_path / "embeddings.tsv",
        settings(epochs=5, batch_size=4), tmp_path / "again.safetensors", tmp_path / "again.tsv",
    )  # fmt: skip
    assert again["train_slides"] == provenance["train_slides"]
    assert (tmp_path / "aligner.safetensors").read_bytes() == (tmp_path / "again.safetensors").read_bytes()


def test_demo_reports_state_each_slide_s_truth(tmp_path):
    truth = pd.DataFrame(
        {
            "slide_id": ["a", "b", "c"],
            "patient_id": ["p1", "p2", "p3"],
            "label": ["adenocarcinoma", "squamous", "squamous"],
            "necrosis_fraction": [0.0, 0.08, 0.3],
            "lymphocytes_fraction_of_tissue": [0.05, 0.1, 0.2],
        }
    )
    truth.to_csv(tmp_path / "truth.tsv", sep="\t", index=False)
    reports = write_demo_reports(tmp_path / "truth.tsv", tmp_path / "reports.tsv", seed=0)
    first = (tmp_path / "reports.tsv").read_bytes()
    write_demo_reports(tmp_path / "truth.tsv", tmp_path / "reports.tsv", seed=0)
    assert (tmp_path / "reports.tsv").read_bytes() == first
    text = dict(zip(reports["slide_id"], reports["report"].str.lower(), strict=True))
    assert any(w in text["a"] for w in ("adenocarcinoma", "glandular carcinoma"))
    assert "squamous" in text["b"] and "squamous" in text["c"] and "squamous" not in text["a"]
    assert "30 %" in text["c"] and "8 %" in text["b"] and "20 %" in text["c"]
    assert any(w in text["c"] for w in ("extensive", "large areas", "abundant"))
    assert read_reports(tmp_path / "reports.tsv").key == "slide_id"


def test_a_slide_that_failed_embedding_is_left_out_and_named(tmp_path, caplog):
    records = write_cohort(tmp_path)
    formats.write_failed_embedding_file(
        tmp_path / "embeddings" / "s003.parquet", DIM, "float32", {"slide_id": "s003", "status": "error"}
    )
    provenance = pipeline.train(
        records, tmp_path / "reports.tsv", tmp_path / "reports.parquet", tmp_path / "embeddings.tsv",
        settings(epochs=2, batch_size=4), tmp_path / "aligner.safetensors", tmp_path / "training.tsv",
    )  # fmt: skip
    assert "s003" not in provenance["train_slides"] + provenance["validation_slides"]
    assert len(provenance["train_slides"] + provenance["validation_slides"]) == 9
    assert "slide s003 left out of training: no embedded tiles (status error)" in caplog.text
