"""Contrastive training: pair tables, a short run that learns and saves a loadable model, slide-level pairs.

The demo cohort is made once per module, smaller than the default (8 patients, 1536-px slides, ~4 s), and
training runs are short (tens of steps at 64 px): these tests prove the machinery, not the accuracy — the
demo's accuracy is measured with the full cohort (see the train module and the project notes).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from histoclip.config import default_config
from histoclip.demo import demo_pairs, make_demo_cohort, prompts_from_synonyms
from histoclip.embedding.models import ModelSpec, load_model
from histoclip.errors import InputError
from histoclip.tiling.grid import TilingParams, run_tiling
from histoclip.training.loop import train_clip
from histoclip.training.pairs import image_folder_pairs, pair_kind, read_pairs
from histoclip.training.settings import TrainSettings

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
LUNG_PHRASES = {
    "LUAD": ("lung adenocarcinoma", "adenocarcinoma of the lung", "pulmonary adenocarcinoma"),
    "LUSC": ("lung squamous cell carcinoma", "squamous cell carcinoma of the lung", "pulmonary squamous carcinoma"),
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_demo_cohort(
        tmp_path_factory.mktemp("demo"), seed=0, n_patients=8, extra_slides=0, slide_px=1536, train_fraction=0.5
    )


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-train.json"
    path.write_text(json.dumps(TINY))
    return ModelSpec("tiny", str(path))


@pytest.fixture(scope="module")
def demo_table(cohort):
    path = cohort.root / "train_pairs.tsv"
    demo_pairs(cohort.root, path, tiles_per_class=60, candidates_per_slide=1500)
    return path


# --------------------------------------------------------------------------------------------------
# Pair tables


def test_demo_pairs_cover_every_class_of_the_train_split(cohort, demo_table):
    frame = pd.read_csv(demo_table, sep="\t")
    sheet = pd.read_csv(cohort.sheet, sep="\t")
    train = set(sheet.loc[sheet["split"] == "train", "slide_id"])
    assert set(frame["slide_id"]) <= train
    counts = frame["tissue_class"].value_counts()
    assert counts.max() <= 60 and "background" not in counts
    assert {"captions.tsv", "sampled"} <= set(frame["source"])
    # the same call gives the same table
    again = demo_pairs(cohort.root, tiles_per_class=60, candidates_per_slide=1500)
    pd.testing.assert_frame_equal(frame, again, check_dtype=False)


def test_read_pairs_keeps_only_the_split_and_resolves_slides(cohort, demo_table):
    pairs = read_pairs(demo_table, sheet_path=cohort.sheet)
    assert pair_kind(pairs) == "tile" and len(pairs) == len(pd.read_csv(demo_table, sep="\t"))
    assert pairs["slide_path"].map(lambda p: p.endswith(".tiff")).all()
    assert (pairs["read_level"] == -1).all()
    # captions.tsv of the whole cohort: split="test" keeps only the test slides' rows
    test = read_pairs(cohort.captions, split="test")
    sheet = pd.read_csv(cohort.sheet, sep="\t")
    assert set(test["slide_id"]) <= set(sheet.loc[sheet["split"] == "test", "slide_id"])
    assert len(read_pairs(cohort.captions, split=None)) == len(pd.read_csv(cohort.captions, sep="\t"))


def test_read_pairs_errors_name_file_row_and_fix(cohort, tmp_path):
    captions = pd.read_csv(cohort.captions, sep="\t").head(5)

    no_caption = tmp_path / "no_caption.tsv"
    captions.drop(columns="caption").to_csv(no_caption, sep="\t", index=False)
    with pytest.raises(InputError, match=r"no_caption\.tsv.*caption.*Fix: add the column"):
        read_pairs(no_caption, sheet_path=cohort.sheet)

    unknown = tmp_path / "unknown.tsv"
    bad = captions.copy()
    bad.loc[2, "slide_id"] = "no-such-slide"
    bad.to_csv(unknown, sep="\t", index=False)
    with pytest.raises(InputError, match=r"unknown\.tsv, line 4.*'no-such-slide' is not in the cohort sheet.*Fix:"):
        read_pairs(unknown, sheet_path=cohort.sheet, split=None)

    coordinates = tmp_path / "coordinates.tsv"
    bad = captions.copy().astype(str)
    bad.loc[0, "x"] = "-3"
    bad.to_csv(coordinates, sep="\t", index=False)
    with pytest.raises(InputError, match=r"coordinates\.tsv, line 2, column 'x'"):
        read_pairs(coordinates, sheet_path=cohort.sheet, split=None)

    (tmp_path / "a.png").write_bytes(b"")
    images = tmp_path / "images.tsv"
    pd.DataFrame({"image": ["a.png", "missing/b.png"], "caption": ["one", "two"]}).to_csv(images, sep="\t", index=False)
    with pytest.raises(InputError, match=r"images\.tsv, line 3, column 'image'.*missing/b\.png.*does not exist.*Fix:"):
        read_pairs(images)

    no_sheet = tmp_path / "tiles_without_sheet.tsv"
    captions.to_csv(no_sheet, sep="\t", index=False)
    with pytest.raises(InputError, match=r"need the cohort sheet.*Fix: pass sheet_path"):
        read_pairs(no_sheet)


def test_time_budget_schedule_follows_steps_not_the_clock():
    from histoclip.training.schedule import Progress, lr_at

    settings = TrainSettings(max_seconds=100, warmup_fraction=0.1)
    schedule = Progress(None, deadline=100.0, started=0.0)
    now, lrs = 0.0, []
    for step in range(10_000):
        if now >= 100.0:
            break
        lrs.append(lr_at(schedule.before_step(step, now), settings))
        now += 5.0 if now < 40 else 0.5  # 8 slow steps (a busy machine), then 120 fast ones
        schedule.after_step(now)
    assert len(lrs) == 128
    # the slow start did not use up the schedule: the fast steps get the peak and a whole cosine decay
    # (by elapsed time, step 68 would be at 70 % of the budget, lr 0.25 of the peak)
    assert max(lrs[20:40]) > 0.9 * settings.lr and lrs[68] > 0.45 * settings.lr
    assert lrs[-1] < 0.01 * settings.lr
    assert all(b <= a + 1e-12 for a, b in zip(lrs[32:], lrs[33:], strict=False))  # then a monotone decay


def test_settings_need_a_budget():
    with pytest.raises(InputError, match="neither steps nor max_seconds"):
        TrainSettings(steps=None, max_seconds=None)


# --------------------------------------------------------------------------------------------------
# Training


def test_training_lowers_the_loss_and_saves_a_loadable_model(cohort, demo_table, repo, tmp_path):
    pairs = read_pairs(demo_table, sheet_path=cohort.sheet)
    out = tmp_path / "model"
    settings = TrainSettings(steps=30, max_seconds=None, image_size=64, batch_size=64, lr=1e-3, log_every=0)
    base = ModelSpec("demo-clip", str(repo / "config" / "models" / "demo-clip.json"))
    report = train_clip(pairs, out, base=base, settings=settings, device="cpu", class_prompts=prompts_from_synonyms())

    assert report.steps == 30 and report.n_pairs == len(pairs) and report.stopped_by == "steps"
    loss = pd.read_csv(out / "loss.tsv", sep="\t")
    assert list(loss.columns) == ["step", "loss", "lr", "seconds"] and len(loss) == 30
    assert loss["loss"].tail(5).mean() < loss["loss"].iloc[0] == pytest.approx(report.first_loss, rel=1e-5)
    assert math.isclose(report.last_loss, loss["loss"].tail(10).mean(), rel_tol=1e-5)
    assert loss["lr"].max() <= settings.lr and loss["lr"].iloc[-1] < 0.05 * settings.lr  # warm-up, cosine to 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    description = json.loads((out / "train.json").read_text())
    assert description["data"]["n_pairs"] == len(pairs) and description["base"]["from_scratch"]
    assert len(description["base"]["weights_sha256"]) == 64 and description["versions"]["torch"]
    assert description["settings"]["image_size"] == 64
    held_in = report.held_in
    assert held_in is not None and held_in["held_in"] and 0 <= held_in["accuracy"] <= 1

    model = load_model(ModelSpec("trained", f"local-dir:{out}"), "cpu")
    assert model.image_size == 64 and model.dim == 64
    tiles = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8)
    image = model.encode_tiles(tiles)
    text = model.encode_texts(["an H&E image of fat.", "tumour necrosis."])
    assert image.shape == (3, 64) and text.shape == (2, 64)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_step_bounded_training_is_reproducible(cohort, demo_table, tiny_base, tmp_path):
    pairs = read_pairs(demo_table, sheet_path=cohort.sheet).head(48)
    settings = TrainSettings(steps=3, max_seconds=None, image_size=32, batch_size=16, log_every=0, seed=3)
    first = train_clip(pairs, tmp_path / "a", base=tiny_base, settings=settings, device="cpu")
    # streamed from the slides by a worker instead of cached: same batches, same augmentation, same weights
    streamed = dataclass_replace(settings, cache_mb=0, num_workers=1)
    second = train_clip(pairs, tmp_path / "b", base=tiny_base, settings=streamed, device="cpu")
    assert first.first_loss == pytest.approx(second.first_loss, rel=1e-5)
    assert first.last_loss == pytest.approx(second.last_loss, rel=1e-5)
    train_clip(pairs, tmp_path / "c", base=tiny_base, settings=settings, device="cpu")
    from safetensors.torch import load_file

    a, b, c = (load_file(tmp_path / name / "open_clip_model.safetensors") for name in ("a", "b", "c"))
    assert all(torch.equal(a[k], c[k]) for k in a)  # the same run twice: identical weights
    # streaming trains with one thread fewer (the worker has a core): float sums differ in the last bits
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def dataclass_replace(settings, **changes):
    import dataclasses

    return dataclasses.replace(settings, **changes)


def test_slide_level_pairs_run_one_step(cohort, tiny_base, tmp_path):
    sheet = pd.read_csv(cohort.sheet, sep="\t")
    train = sheet[sheet["split"] == "train"].head(3)
    tiles_dir = tmp_path / "tiles"
    for row in train.itertuples():
        run_tiling(
            cohort.root / row.path,
            row.slide_id,
            tiles_dir / f"{row.slide_id}.parquet",
            tmp_path / "qc.png",
            params=TilingParams.from_config(default_config({"tiling": {"tile_px": 224}})),
        )
    table = tmp_path / "slide_pairs.tsv"
    pd.DataFrame(
        {
            "slide_id": train["slide_id"],
            "caption": [f"a slide of {label}." for label in train["label"]],
            "label": train["label"],
        }
    ).to_csv(table, sep="\t", index=False)
    pairs = read_pairs(table, sheet_path=cohort.sheet, tiles_dir=tiles_dir)
    assert pair_kind(pairs) == "slide" and len(pairs) == 3

    settings = TrainSettings(steps=1, max_seconds=None, image_size=32, batch_size=8, bag_size=4, log_every=0)
    prompts = {"adenocarcinoma": ["a slide of adenocarcinoma."], "squamous": ["a slide of squamous."]}
    report = train_clip(
        pairs,
        tmp_path / "model",
        base=tiny_base,
        settings=settings,
        device="cpu",
        tiles_dir=tiles_dir,
        class_prompts=prompts,
    )
    assert report.steps == 1 and math.isfinite(report.first_loss) and report.n_pairs == 3
    assert json.loads((tmp_path / "model" / "train.json").read_text())["data"]["kind"] == "slide"
    assert load_model(ModelSpec("s", f"local-dir:{tmp_path / 'model'}"), "cpu").image_size == 32

    # without tile files, slide-level pairs say what is missing
    with pytest.raises(InputError, match="tile file"):
        read_pairs(table, sheet_path=cohort.sheet, tiles_dir=tmp_path / "nowhere")


def test_a_failed_run_leaves_the_previous_model_in_place(cohort, demo_table, tiny_base, tmp_path):
    pairs = read_pairs(demo_table, sheet_path=cohort.sheet).head(16)
    out = tmp_path / "model"
    settings = TrainSettings(steps=1, max_seconds=None, image_size=32, batch_size=8, log_every=0)
    train_clip(pairs, out, base=tiny_base, settings=settings, device="cpu")
    before = (out / "open_clip_model.safetensors").read_bytes()
    broken = pairs.copy()
    broken["slide_path"] = str(tmp_path / "gone.tiff")
    with pytest.raises(InputError, match="does not exist"):
        train_clip(broken, out, base=tiny_base, settings=settings, device="cpu")
    assert (out / "open_clip_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.shared_data
def test_tcga_patches_train_and_report_held_in_accuracy(shared_data, repo, tmp_path):
    root = shared_data / "patches" / "tcga_luadlusc" / "train"
    table = tmp_path / "tcga_pairs.tsv"
    frame = image_folder_pairs(root, table, phrases=LUNG_PHRASES)
    assert set(frame["label"]) == {"LUAD", "LUSC"} and len(frame) == 130
    pairs = read_pairs(table)
    assert pair_kind(pairs) == "image"

    settings = TrainSettings(max_seconds=25, image_size=64, batch_size=64, log_every=0)
    prompts = {label: [f"an H&E image of {p}." for p in words] for label, words in LUNG_PHRASES.items()}
    base = ModelSpec("demo-clip", str(repo / "config" / "models" / "demo-clip.json"))
    report = train_clip(pairs, tmp_path / "model", base=base, settings=settings, device="cpu", class_prompts=prompts)
    assert report.steps >= 1 and report.stopped_by == "max_seconds"
    assert (tmp_path / "model" / "open_clip_model.safetensors").is_file()
    held_in = json.loads((tmp_path / "model" / "train.json").read_text())["held_in_zero_shot"]
    assert held_in["held_in"] is True and held_in["n"] == 130
    assert 0.0 <= held_in["accuracy"] <= 1.0 and np.isfinite(held_in["balanced_accuracy"])
    assert report.held_in == held_in
