"""Diagnoses that are true (issue 14): slides smaller than one tile, an empty mpp cell against a missing mpp
column, fixes that depend on ``on_slide_error``, and ``on_slide_error: fail`` saying each bad slide once.

Each test asserts the message a user reads, on real files (../shared/data) or on slides written here the way
they come (tifffile pyramids OpenSlide reads).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from bad_slides import blank_slide, copy_workflow, good_slide, snakemake, truncated_slide, write_clinical, write_sheet

from histoclip.config import default_config
from histoclip.demo import write_pyramid_tiff
from histoclip.errors import SlideError
from histoclip.preflight import SlideSettings, check_sheet, check_slides
from histoclip.store import read_metadata
from histoclip.tiling.grid import run_tiling
from histoclip.tiling.shards import SlideToTile, tile_shard
from histoclip.tiling.tissue import TissueParams

REPO = Path(__file__).resolve().parents[1]


def small_slide(path: Path, side: int = 50) -> Path:
    """A ``side`` × ``side`` px pyramid at 0.5 µm/px with stained tissue on most of it (a crop, not a slide)."""
    rgb = np.full((side, side, 3), 240, np.uint8)
    rgb[side // 5 : side * 4 // 5, side // 5 : side * 4 // 5] = (200, 110, 180)
    write_pyramid_tiff(path, rgb, mpp=0.5, downsamples=(1,))
    return path


def settings(on_slide_error: str) -> SlideSettings:
    return SlideSettings.from_config(default_config({"on_slide_error": on_slide_error}))


def slide_problem(sheet: Path, on_slide_error: str = "fail"):
    """The one slide problem of the preflight of a sheet (and the slide's check)."""
    records, sheet_problems = check_sheet(sheet)
    assert sheet_problems == []
    (check,) = check_slides(records, settings(on_slide_error), threads=1)
    (problem,) = [p for p in check.problems if p.severity != "warning"]
    return check, problem


# --- slides smaller than one tile ----------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_slides_smaller_than_one_tile_are_a_preflight_error_or_a_skip(shared_data, tmp_path):
    cases = {
        "s16": (shared_data / "synthetic" / "openslide-python-small.svs", "16×16 px at 0.499 µm/px"),
        "s50": (small_slide(tmp_path / "s50.tiff"), "50×50 px at 0.5 µm/px"),
    }
    for slide_id, (path, size) in cases.items():
        sheet = write_sheet(tmp_path / f"{slide_id}.tsv", [[slide_id, "P1", path]])
        message = f"is smaller than one tile: level 0 is {size}"
        check, problem = slide_problem(sheet, "fail")
        assert check.status == "error" and problem.severity == "error"
        assert problem.problem.startswith(message) and "224-px tile at 0.5 µm/px needs 224×224 level-0 px" in (
            problem.problem
        )
        assert "not a thumbnail, label image or crop" in problem.fix
        check, problem = slide_problem(sheet, "record")
        assert check.status == "skip" and problem.severity == "skip"
        assert problem.fix.endswith("(on_slide_error: record, so the run records this slide as failed and goes on)")


@pytest.mark.shared_data
def test_tiling_a_slide_smaller_than_one_tile_says_so_not_no_tissue(shared_data, tmp_path):
    for path in (shared_data / "synthetic" / "openslide-python-small.svs", small_slide(tmp_path / "s50.tiff")):
        with pytest.raises(SlideError) as err:
            run_tiling(path, "tiny", tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="fail")
        assert "slide 'tiny': is smaller than one tile" in str(err.value)
        assert "no tissue tile" not in str(err.value)
        meta = run_tiling(path, "tiny", tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="record")
        assert (
            meta["status"] == "error" and "is smaller than one tile" in read_metadata(tmp_path / "t.parquet")["error"]
        )


def test_a_slide_of_exactly_one_tile_is_tiled(tmp_path):
    path = small_slide(tmp_path / "one.tiff", side=224)  # 224 px at 0.5 µm/px: one 224-px tile at 0.5 µm/px
    # its tissue (67 µm square) is below the default debris size, which this test is not about
    tissue = replace(TissueParams.from_config(default_config()), min_region_area_mm2=0.0)
    meta = run_tiling(
        path, "one", tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="fail", tissue_params=tissue
    )
    assert meta["status"] == "ok" and meta["n_tiles"] == 1


# --- mpp: an empty cell is not a missing column ---------------------------------------------------------------------


def test_missing_mpp_column_says_add_the_column(tmp_path):
    slide = good_slide(tmp_path / "nompp.tiff", mpp=None)
    sheet = write_sheet(tmp_path / "slides.tsv", [["nompp", "P1", slide]])
    _, problem = slide_problem(sheet)
    assert problem.problem.startswith("has no usable microns-per-pixel (mpp)")
    assert "'mpp' column is empty" not in problem.problem
    assert problem.fix.startswith("add an 'mpp' column to the cohort sheet with this slide's level-0 µm/px")


def test_empty_mpp_cell_names_the_cell_and_says_fill_it(tmp_path):
    slide = good_slide(tmp_path / "nompp.tiff", mpp=None)
    other = good_slide(tmp_path / "other.tiff", mpp=0.5)
    rows = [["other", "P1", other, "0.5"], ["nompp", "P2", slide, ""]]
    sheet = write_sheet(tmp_path / "slides.tsv", rows, ("slide_id", "patient_id", "path", "mpp"))
    records, _ = check_sheet(sheet)
    checks = check_slides(records, settings("fail"), threads=1)
    assert checks[0].status == "ok" and checks[1].status == "error"
    (problem,) = checks[1].problems
    assert problem.problem.endswith("and its cell in the cohort sheet's 'mpp' column is empty")
    assert problem.fix == (
        f"fill in this slide's empty cell of the cohort sheet's 'mpp' column ({sheet}, line 3, column 'mpp') "
        "with this slide's level-0 µm/px (e.g. 0.25 for 40x, 0.5 for 20x)"
    )
    assert "add an 'mpp' column" not in problem.fix

    # the tile job says the same (the cell travels beside the settings, not in them)
    job = SlideToTile(
        "nompp",
        str(slide),
        str(tmp_path / "t.parquet"),
        str(tmp_path / "q.png"),
        shard_settings("fail"),
        records[1].mpp_cell,
    )
    with pytest.raises(SlideError) as err:
        tile_shard([job])
    assert f"({sheet}, line 3, column 'mpp')" in str(err.value) and "add an 'mpp' column" not in str(err.value)


# --- fixes never advise setting what is already set -----------------------------------------------------------------


def shard_settings(on_slide_error: str) -> dict:
    config = default_config({"on_slide_error": on_slide_error})
    return {
        "on_slide_error": on_slide_error,
        "tiling": config["tiling"],
        "tissue": config["tissue"],
        "mpp": config["mpp"],
        "qc_thumbnail_px": 256,
        "patient_id": "P1",
        "sheet_mpp": None,
    }


@pytest.mark.shared_data
def test_fixes_depend_on_the_on_slide_error_setting(shared_data, tmp_path):
    bad = {
        "blank": blank_slide(tmp_path / "blank.tiff"),
        "small": small_slide(tmp_path / "small.tiff"),
        "cut": truncated_slide(tmp_path / "cut.tiff"),
        "nompp": good_slide(tmp_path / "nompp.tiff", mpp=None),
        "unreadable": shared_data / "broken" / "openslide-python-unreadable.svs",
        "fluorescence": shared_data / "tiff" / "pathml-smalltif.tif",
    }
    for slide_id, path in bad.items():
        meta = run_tiling(path, slide_id, tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="record")
        assert meta["status"] == "error", slide_id
        assert "set on_slide_error" not in meta["error"], meta["error"]
        with pytest.raises(SlideError) as err:
            run_tiling(path, slide_id, tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="fail")
        if "on_slide_error" in str(err.value):
            assert "set on_slide_error: record" in str(err.value), str(err.value)
    # the one whose fix talks about the setting, under each setting
    blank = run_tiling(bad["blank"], "blank", tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="record")
    assert blank["error"].endswith("(on_slide_error: record, so the run records this slide as failed and goes on)"), (
        blank["error"]
    )
    sheet = write_sheet(tmp_path / "s.tsv", [[slide_id, "P", path] for slide_id, path in bad.items()])
    records, _ = check_sheet(sheet)
    for check in check_slides(records, settings("record"), threads=1):
        # the preflight does not detect tissue (docs: histoclip.preflight), so the blank slide passes it
        assert check.status == ("ok" if check.slide_id == "blank" else "skip"), check
        assert all("set on_slide_error" not in p.fix for p in check.problems), check.problems


# --- on_slide_error: fail says each bad slide once; the traceback only in the log ------------------------------------

TILE_JOB = """
import json, sys
from histoclip.logs import rule_log
from histoclip.tiling.shards import SlideToTile, tile_shard
jobs = [SlideToTile(*job) for job in json.loads(sys.argv[2])]
with rule_log(sys.argv[1], "histoclip.tile"):
    tile_shard(jobs, threads=2)
"""


def run_tile_job(tmp_path: Path, slides: dict[str, Path]) -> tuple[subprocess.CompletedProcess, str]:
    """The tile rule's script, as Snakemake runs it (its own process, rule_log, worker processes)."""
    jobs = [
        [
            slide_id,
            str(path),
            str(tmp_path / f"{slide_id}.parquet"),
            str(tmp_path / f"{slide_id}.png"),
            shard_settings("fail"),
        ]
        for slide_id, path in slides.items()
    ]
    log = tmp_path / "tile.log"
    done = subprocess.run(
        [sys.executable, "-c", TILE_JOB, str(log), json.dumps(jobs)], capture_output=True, text=True, timeout=300
    )
    return done, log.read_text()


@pytest.mark.shared_data
def test_fail_mode_prints_one_line_per_bad_slide_and_the_traceback_only_to_the_log(shared_data, tmp_path):
    good = good_slide(tmp_path / "good.tiff")
    done, log = run_tile_job(
        tmp_path, {"good": good, "bad": shared_data / "broken" / "openslide-python-unreadable.svs"}
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr  # "slide good: N tiles", and the bad slide's error
    assert "INFO histoclip.tiling.shards: slide good:" in lines[0]
    assert lines[1].endswith(
        "ERROR histoclip.tile: slide 'bad': pixel data cannot be decoded at level 0: Bogus marker length "
        "Fix: the file is corrupt or truncated; re-export or re-scan it, or remove it from the sheet"
    )
    assert "Traceback" not in done.stderr and "_RemoteTraceback" not in done.stderr
    assert "_RemoteTraceback" in log and "openslide.lowlevel.OpenSlideError: Bogus marker length" in log


def test_fail_mode_with_two_bad_slides_names_each_once(tmp_path):
    slides = {
        "good": good_slide(tmp_path / "good.tiff"),
        "cut": truncated_slide(tmp_path / "cut.tiff"),
        "blank": blank_slide(tmp_path / "blank.tiff"),
    }
    done, log = run_tile_job(tmp_path, slides)
    assert done.returncode == 1
    errors = done.stderr[done.stderr.index(" ERROR ") :].splitlines()
    assert errors[0].endswith(
        "ERROR histoclip.tile: 2 of 3 slides of this shard could not be tiled (the others are "
        "kept and will be reused by the next run):"
    )
    assert sorted(line.split(":")[0] for line in errors[1:]) == ["  - slide 'blank'", "  - slide 'cut'"]
    for slide_id in ("cut", "blank"):
        assert done.stderr.count(f"slide '{slide_id}'") == 1, done.stderr
        assert log.count(f"slide {slide_id} could not be tiled") == 1  # when it failed, with its traceback
    assert "Traceback" not in done.stderr and log.count("_RemoteTraceback") >= 2


def test_a_bug_keeps_its_traceback_on_the_console_once(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from histoclip.logs import rule_log
        with rule_log(sys.argv[1], "histoclip.job"):
            {}["missing"]
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "job.log")], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.count("Traceback") == 1 and done.stderr.count("KeyError: 'missing'") == 1, done.stderr
    assert "Traceback" in (tmp_path / "job.log").read_text()


@pytest.mark.integration
@pytest.mark.shared_data
def test_snakemake_fail_mode_shows_the_bad_slide_once(shared_data, tmp_path):
    """What Snakemake prints for the failed tile job is its own block, once; ours is one line."""
    workdir = copy_workflow(tmp_path / "wf")
    rows = [
        ["a", "P1", good_slide(tmp_path / "a.tiff")],
        ["bad", "P2", shared_data / "broken" / "openslide-python-unreadable.svs"],
    ]
    sheet = write_sheet(tmp_path / "slides.tsv", rows)
    clinical = write_clinical(tmp_path / "clinical.tsv", [["P1", "5", "1"], ["P2", "6", "0"]])
    result = snakemake(
        workdir, "results/qc/cohort.tsv", "--config", f"slides={sheet}", f"clinical={clinical}", check=False
    )
    assert result.returncode != 0
    assert result.stderr.count("slide 'bad'") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("Error in rule tile_shard00000:") == 1
    assert result.stderr.count("returned non-zero exit status 1") == 1
    log = (workdir / "results/logs/tile/shard00000.log").read_text()
    assert "_RemoteTraceback" in log and "Bogus marker length" in log
