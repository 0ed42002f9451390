"""Slides staged to local scratch (config tiling.stage_dir / embedding.stage_dir, histoclip.staging).

What a user relies on: the outputs are the bytes they would be without staging (tile files record each slide's
own path), nothing is left in the scratch folder after the shard, also when a slide fails, and a folder that is
too small or a variable that is not set is said before anything is copied.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pyarrow.parquet as pq
import pytest
from bad_slides import good_slide, truncated_slide
from tiny_models import TINY_OPEN_CLIP

from histoclip.config import default_config
from histoclip.embedding.embed import SlideJob, embed_shard
from histoclip.embedding.models import ModelSpec, load_model
from histoclip.errors import InputError, SlideError
from histoclip.staging import stage_unit, staged
from histoclip.store import read_metadata
from histoclip.tiling import slide as wsi
from histoclip.tiling.shards import SlideToTile, tile_shard


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-staging.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    return load_model(ModelSpec("tiny", str(path), seed=1), "cpu")


def tiling_settings(on_slide_error="fail"):
    config = default_config({"tiling": {"tile_px": 64}, "on_slide_error": on_slide_error})
    return {
        "on_slide_error": config["on_slide_error"],
        "tiling": {k: v for k, v in config["tiling"].items() if k not in ("shard_size", "threads", "stage_dir")},
        "tissue": config["tissue"],
        "mpp": config["mpp"],
        "qc_thumbnail_px": config["qc"]["thumbnail_px"],
        "patient_id": "P1",
        "sheet_mpp": None,
    }


def shard(slides, out, on_slide_error="fail"):
    return [
        SlideToTile(
            slide.stem,
            str(slide),
            str(out / "tiles" / f"{slide.stem}.parquet"),
            str(out / "qc" / f"{slide.stem}.png"),
            tiling_settings(on_slide_error),
        )
        for slide in slides
    ]


def contents(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def cohort(tmp_path):
    """Two slides on 'network storage' (a folder of their own)."""
    storage = tmp_path / "storage"
    storage.mkdir()
    return [good_slide(storage / "a.tiff", side=1024, seed=1), good_slide(storage / "b.tiff", side=768, seed=2)]


def test_staged_shards_write_the_same_bytes_and_leave_nothing_behind(cohort, tiny, tmp_path, caplog):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tile_shard(shard(cohort, tmp_path / "plain"))
    with caplog.at_level(logging.INFO, logger="histoclip.staging"):
        tile_shard(shard(cohort, tmp_path / "staged"), threads=2, stage_dir=str(scratch))  # in worker processes
    assert "tiling.stage_dir: 2 slide(s)" in caplog.text and str(scratch) in caplog.text
    for slide in cohort:
        plain, staged_tiles = (tmp_path / run / "tiles" / f"{slide.stem}.parquet" for run in ("plain", "staged"))
        assert read_metadata(staged_tiles)["path"] == str(slide)  # the slide's own path, not the copy's
        assert pq.read_table(staged_tiles).equals(pq.read_table(plain))
        assert read_metadata(staged_tiles) == read_metadata(plain)
        qc = [(tmp_path / run / "qc" / f"{slide.stem}.png").read_bytes() for run in ("plain", "staged")]
        assert qc[0] == qc[1]
    assert contents(scratch) == []

    jobs = {
        run: [
            SlideJob.from_tile_file(tmp_path / "plain" / "tiles" / f"{s.stem}.parquet", tmp_path / run / s.name)
            for s in cohort
        ]
        for run in ("emb-plain", "emb-staged")
    }
    embed_shard(jobs["emb-plain"], tiny, batch_size=16, num_workers=1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="histoclip.staging"):
        embed_shard(jobs["emb-staged"], tiny, batch_size=16, num_workers=1, stage_dir=str(scratch))
    assert "embedding.stage_dir: 2 slide(s)" in caplog.text
    for slide in cohort:
        plain, copy = (tmp_path / run / slide.name for run in ("emb-plain", "emb-staged"))
        assert pq.read_table(copy).equals(pq.read_table(plain))
        assert read_metadata(copy) == read_metadata(plain)
    assert contents(scratch) == []


def test_a_bad_slide_in_a_staged_shard_names_its_own_file_and_leaves_nothing_behind(cohort, tiny, tmp_path):
    scratch = tmp_path / "scratch"
    cut = truncated_slide(cohort[0].parent / "cut.tiff", 0.9)
    slides = [cohort[0], cut]
    with pytest.raises(SlideError) as err:
        tile_shard(shard(slides, tmp_path / "out"), stage_dir=str(scratch))  # the folder is made
    message = str(err.value)
    assert message.startswith("slide 'cut': ") and "is truncated" in message
    assert str(cut) in message and str(scratch) not in message
    assert contents(scratch) == [] and (tmp_path / "out" / "tiles" / "a.parquet").exists()

    # recorded, not raised: the tile file keeps the cause, naming the slide's own file
    tile_shard(shard(slides, tmp_path / "rec", on_slide_error="record"), stage_dir=str(scratch))
    meta = read_metadata(tmp_path / "rec" / "tiles" / "cut.parquet")
    assert meta["status"] == "error" and meta["path"] == str(cut) and str(cut) in meta["error"]
    assert str(scratch) not in meta["error"] and contents(scratch) == []

    # embedding: the slide is cut short after tiling (a copy overwritten mid-run); the shard fails, nothing is left
    tiles = [tmp_path / "out" / "tiles" / "a.parquet"]
    shutil.copy(cohort[1], tmp_path / "b2.tiff")
    tile_shard(shard([tmp_path / "b2.tiff"], tmp_path / "out"))
    tiles.append(tmp_path / "out" / "tiles" / "b2.parquet")
    truncated_slide(tmp_path / "b2.tiff", 0.5, side=768)
    jobs = [SlideJob.from_tile_file(t, tmp_path / "emb" / t.name) for t in tiles]
    with pytest.raises(SlideError) as err:
        embed_shard(jobs, tiny, batch_size=16, num_workers=1, stage_dir=str(scratch))
    assert "slide 'b2'" in str(err.value) and str(scratch) not in str(err.value)
    assert contents(scratch) == [] and (tmp_path / "emb" / "a.parquet").exists()


def test_too_little_room_is_said_before_anything_is_copied(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    huge = tmp_path / "storage" / "huge.svs"
    huge.parent.mkdir()
    free = shutil.disk_usage(scratch).free
    with open(huge, "wb") as fh:  # sparse: larger than the free space, taking none of it
        fh.truncate(free + 10**12)
    with pytest.raises(InputError) as err:
        tile_shard(shard([huge], tmp_path / "out"), stage_dir=str(scratch))
    message = str(err.value)
    assert message.startswith("config tiling.stage_dir: staging this shard's 1 slide(s) needs ")
    assert f"({free + 10**12:,} bytes) in {str(scratch)!r}, which has " in message and "free" in message
    assert "lower the shard size" in message and "null" in message
    assert contents(scratch) == [] and not (tmp_path / "out" / "tiles").exists()


def test_stage_dir_expands_variables_where_the_job_runs(cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOCLIP_TEST_SCRATCH", str(tmp_path / "node-local"))
    with staged([str(cohort[0])], "$HISTOCLIP_TEST_SCRATCH/stage", "embedding.stage_dir") as where:
        copy = where[str(cohort[0])]
        assert copy.startswith(str(tmp_path / "node-local" / "stage")) and os.path.getsize(copy) > 0
    assert contents(tmp_path / "node-local" / "stage") == []
    monkeypatch.delenv("HISTOCLIP_TEST_SCRATCH")
    with pytest.raises(InputError) as err, staged([str(cohort[0])], "${HISTOCLIP_TEST_SCRATCH}/x", "tiling.stage_dir"):
        pass
    assert str(err.value).startswith(
        "config tiling.stage_dir: '${HISTOCLIP_TEST_SCRATCH}/x' names the environment variable "
        "$HISTOCLIP_TEST_SCRATCH, which is not set where this job runs"
    )


@pytest.mark.shared_data
def test_multi_file_slides_are_staged_whole_or_read_in_place(shared_data, tmp_path):
    # DICOM: the file's folder whole (OpenSlide reads the series' instances from it)
    dicom = shared_data / "synthetic" / "openslide-python-boxes-dicom" / "openslide-python-boxes_0.dcm"
    # MIRAX: the index file and its data folder beside it
    mirax = tmp_path / "storage" / "slide.mrxs"
    (mirax.with_suffix("") / "Data0000.dat").parent.mkdir(parents=True)
    mirax.write_text("[GENERAL]\n")
    (mirax.with_suffix("") / "Data0000.dat").write_bytes(b"\x00" * 100)
    (mirax.with_suffix("") / "Slidedat.ini").write_text("[GENERAL]\n")
    vms = tmp_path / "storage" / "slide.vms"
    vms.write_text("[Virtual Microscope Specimen]\n")
    scratch = tmp_path / "scratch"
    with staged([str(dicom), str(mirax), str(vms)], str(scratch), "embedding.stage_dir") as where:
        staged_dicom = where[str(dicom)]
        assert sorted(os.listdir(os.path.dirname(staged_dicom))) == sorted(os.listdir(dicom.parent))
        with wsi.open_wsi(staged_dicom, "boxes") as slide, wsi.open_wsi(dicom, "boxes") as original:
            assert slide.name == "openslide" and slide.level_dimensions == original.level_dimensions
        staged_mirax = where[str(mirax)]
        assert os.path.basename(staged_mirax) == "slide.mrxs"
        assert sorted(os.listdir(os.path.join(os.path.dirname(staged_mirax), "slide"))) == [
            "Data0000.dat",
            "Slidedat.ini",
        ]
        assert where[str(vms)] == str(vms)  # read in place
    assert contents(scratch) == []
    assert stage_unit(tmp_path / "missing.svs") is None and stage_unit(tmp_path) is None


@pytest.mark.integration
def test_workflow_stages_slides_and_gives_concurrent_embedding_jobs_their_own_gpu(tmp_path, monkeypatch):
    """Through Snakemake: two embedding jobs at once (--resources gpu=2, embedding.devices [0, 1]) each claim their
    own GPU slot (here there is no GPU: they run on the CPU with CUDA_VISIBLE_DEVICES set); slides are staged under
    $HISTOCLIP_TEST_SCRATCH; setting or unsetting either re-runs nothing."""
    from bad_slides import copy_workflow, snakemake, write_sheet

    workdir = copy_workflow(tmp_path / "wf")
    storage = tmp_path / "storage"
    storage.mkdir()
    slides = [good_slide(storage / "a.tiff", side=1024, seed=1), good_slide(storage / "b.tiff", side=768, seed=2)]
    write_sheet(tmp_path / "sheet.tsv", [("a", "P1", str(slides[0])), ("b", "P2", str(slides[1]))])
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("HISTOCLIP_TEST_SCRATCH", str(scratch))
    (workdir / "run.yaml").write_text(
        "embedding:\n  models: [tiny]\n  shard_size: 1\n  threads: 1\n  devices: ['0', '1']\n"
        "  stage_dir: $HISTOCLIP_TEST_SCRATCH/embed\n"
        "tiling:\n  stage_dir: $HISTOCLIP_TEST_SCRATCH/tile\n"
        "zeroshot:\n  prompt_sets: []\n"
    )
    config = ["--configfile", "run.yaml", "--config", f"slides={tmp_path / 'sheet.tsv'}", "clinical=null"]
    snakemake(workdir, "results/embeddings/tiny.tsv", *config, "--resources", "gpu=2")

    logs = [(workdir / f"results/logs/embed/tiny/shard0000{i}.log").read_text() for i in (0, 1)]
    claimed = sorted(
        line.split("GPU ")[1].split(" ")[0] for log in logs for line in log.splitlines() if " is this job's" in line
    )
    assert claimed == ["0", "1"]
    assert all("embedding.stage_dir: 1 slide(s)" in log for log in logs)
    assert "tiling.stage_dir: 2 slide(s)" in (workdir / "results/logs/tile/shard00000.log").read_text()
    assert contents(scratch) == ["embed", "tile"]  # the folders stay, empty
    for slide in slides:
        assert read_metadata(workdir / f"results/tiles/{slide.stem}.parquet")["path"] == str(slide)

    (workdir / "plain.yaml").write_text(
        "embedding:\n  models: [tiny]\n  shard_size: 1\n  threads: 1\nzeroshot:\n  prompt_sets: []\n"
    )
    plain = ["--configfile", "plain.yaml", "--config", f"slides={tmp_path / 'sheet.tsv'}", "clinical=null"]
    dry = snakemake(workdir, "results/embeddings/tiny.tsv", *plain, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr
