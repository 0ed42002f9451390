"""Tiling a shard of slides in one job: outputs equal per-slide tiling, and a re-run reuses exactly the slides
whose slide file and settings are unchanged (Snakemake deletes a failed or re-run job's outputs first)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bad_slides import blank_slide, good_slide, truncated_slide

from histoclip.config import default_config
from histoclip.errors import InputErrors, SlideError
from histoclip.resume import finished_path
from histoclip.store import read_metadata
from histoclip.tiling.grid import TilingParams, run_tiling
from histoclip.tiling.shards import SlideToTile, tile_shard

TILING = {"target_mpp": 0.5, "tile_px": 64, "overlap_px": 0, "min_tissue_fraction": 0.5}
SETTINGS = {
    "on_slide_error": "fail",
    "tiling": TILING,
    "tissue": default_config()["tissue"],  # the whole section, as the tile rule passes it
    "mpp": {"min": 0.05, "max": 20.0},
    "qc_thumbnail_px": 256,
    "sheet_mpp": None,
}


def shard(folder: Path, paths: dict[str, Path], **overrides) -> list[SlideToTile]:
    out = folder / "results"
    return [
        SlideToTile(
            slide_id,
            str(path),
            str(out / "tiles" / f"{slide_id}.parquet"),
            str(out / "qc" / f"{slide_id}.png"),
            {**SETTINGS, "patient_id": f"P{slide_id}", **overrides.get(slide_id, {})},
        )
        for slide_id, path in paths.items()
    ]


def remove_outputs(slides: list[SlideToTile]) -> None:
    """What Snakemake does before re-running a job."""
    for slide in slides:
        Path(slide.tiles_out).unlink(missing_ok=True)
        Path(slide.qc_out).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("slides")
    return {f"s{i}": good_slide(folder / f"s{i}.tiff", side=768, seed=i) for i in range(3)}


@pytest.mark.parametrize("threads", [1, 2])
def test_a_shard_writes_what_tiling_each_slide_alone_writes(tmp_path, slides, threads):
    jobs = shard(tmp_path, slides)
    report = tile_shard(jobs, threads=threads)
    assert sorted(report.tiled) == sorted(slides) and report.reused == [] and not report.errors
    for job in jobs:
        own = {
            "patient_id": job.settings["patient_id"],
            "params": TilingParams.from_config({"tiling": TILING}),
            "qc_thumbnail_px": 256,
        }
        alone = run_tiling(job.path, job.slide_id, tmp_path / "alone.parquet", tmp_path / "alone.png", **own)
        meta = read_metadata(job.tiles_out)
        assert meta["n_tiles"] == alone["n_tiles"] > 0 and meta["patient_id"] == f"P{job.slide_id}"
        assert Path(job.tiles_out).read_bytes() == (tmp_path / "alone.parquet").read_bytes()
        assert finished_path(job.tiles_out).exists() and finished_path(job.qc_out).exists()
    assert report.n_tiles == sum(read_metadata(j.tiles_out)["n_tiles"] for j in jobs)


def test_rerun_reuses_unchanged_slides_and_redoes_changed_ones(tmp_path, slides, caplog):
    jobs = shard(tmp_path, slides)
    tile_shard(jobs)
    first = {job.slide_id: Path(job.tiles_out).read_bytes() for job in jobs}

    remove_outputs(jobs)
    again = tile_shard(jobs)
    assert sorted(again.reused) == sorted(slides) and again.tiled == []
    assert {job.slide_id: Path(job.tiles_out).read_bytes() for job in jobs} == first
    assert all(Path(job.qc_out).exists() for job in jobs)

    # s1's tiling settings change and s2's slide file is replaced: only those two are tiled again
    changed = shard(tmp_path, slides, s1={"tiling": {**TILING, "tile_px": 32}})
    stat = os.stat(slides["s2"])
    os.utime(slides["s2"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    remove_outputs(changed)
    redo = tile_shard(changed)
    assert redo.reused == ["s0"] and sorted(redo.tiled) == ["s1", "s2"]
    assert read_metadata(changed[1].tiles_out)["tile_px"] == 32


def test_bad_slides_fail_after_the_good_ones_are_kept(tmp_path, slides):
    paths = {"s0": slides["s0"], "cut": truncated_slide(tmp_path / "cut.tiff"), "s1": slides["s1"]}
    jobs = shard(tmp_path, paths)
    with pytest.raises(SlideError, match="slide 'cut'"):
        tile_shard(jobs, threads=2)
    assert finished_path(jobs[0].tiles_out).exists() and finished_path(jobs[2].tiles_out).exists()
    assert not finished_path(jobs[1].tiles_out).exists()

    # two bad slides: one error naming both, and the good slide is reused from the first run
    paths["blank"] = blank_slide(tmp_path / "blank.tiff")
    jobs = shard(tmp_path, paths)
    remove_outputs(jobs)
    with pytest.raises(InputErrors, match="2 of 4 slides") as raised:
        tile_shard(jobs)
    assert "slide 'cut'" in str(raised.value) and "slide 'blank'" in str(raised.value)


def test_recorded_failures_are_written_but_never_kept(tmp_path, slides):
    paths = {"s0": slides["s0"], "cut": truncated_slide(tmp_path / "cut.tiff")}
    jobs = shard(tmp_path, paths, cut={"on_slide_error": "record"})
    report = tile_shard(jobs)
    assert report.tiled == ["s0"] and report.recorded_failed == ["cut"]
    assert read_metadata(jobs[1].tiles_out)["status"] == "error"
    assert not finished_path(jobs[1].tiles_out).exists()  # a re-run tries the slide again
    remove_outputs(jobs)
    assert tile_shard(jobs).recorded_failed == ["cut"]


def test_cohort_table_from_shard_tables_equals_the_table_written_at_once(tmp_path, slides):
    from histoclip.store import concat_tsv_atomic
    from histoclip.tiling.qc import write_cohort_table

    paths = {**slides, "cut": truncated_slide(tmp_path / "cut.tiff")}  # an error message in the table too
    jobs = shard(tmp_path, paths, cut={"on_slide_error": "record"})
    tile_shard(jobs)
    tiles = [job.tiles_out for job in jobs]
    write_cohort_table(tiles[:2], tmp_path / "a.tsv")
    write_cohort_table(tiles[2:], tmp_path / "b.tsv")
    write_cohort_table(tiles, tmp_path / "at_once.tsv")
    concat_tsv_atomic([tmp_path / "a.tsv", tmp_path / "b.tsv"], tmp_path / "cohort.tsv")
    assert (tmp_path / "cohort.tsv").read_bytes() == (tmp_path / "at_once.tsv").read_bytes()
    (tmp_path / "other.tsv").write_text("slide_id\tsomething_else\nx\t1\n")
    with pytest.raises(ValueError, match="differ"):
        concat_tsv_atomic([tmp_path / "a.tsv", tmp_path / "other.tsv"], tmp_path / "bad.tsv")


def test_a_missing_slide_file_is_that_slides_error(tmp_path, slides):
    jobs = shard(tmp_path, {"s0": slides["s0"], "gone": tmp_path / "gone.tiff"})
    with pytest.raises(SlideError, match="slide 'gone'"):
        tile_shard(jobs)
    assert finished_path(jobs[0].tiles_out).exists()
