"""Crash safety: a run killed with SIGKILL during tiling and again during embedding, then re-run, ends with every
output complete, valid and equal to an uninterrupted run's, and nothing half-written left behind.

The kill takes the whole process group (Snakemake, its job scripts, the DataLoader workers), as a node failure
or a walltime kill does. The re-run is what the README tells a user to do: ``snakemake --rerun-incomplete``
(after ``--unlock``, as the killed Snakemake could not remove its lock).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from bad_slides import copy_workflow, good_slide, kill_when, snakemake, write_clinical, write_sheet
from PIL import Image

from histoclip.store import read_metadata

pytestmark = [pytest.mark.slow, pytest.mark.integration]

N_SLIDES = 5
#: Small tiles make many of them: embedding takes long enough to be caught in the middle.
CONFIG = (
    "embedding:\n  models: [tiny]\n  num_workers: 1\n  batch_size: 16\n"
    "zeroshot:\n  prompt_sets: [nsclc]\n  top_k: 5\n"
    "tiling:\n  tile_px: 56\n"
)
TARGETS = ("results/qc/cohort.tsv", "results/zeroshot/tiny/nsclc/calls.tsv")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("cohort")
    rows = [[f"s{i}", f"P{i}", good_slide(folder / f"s{i}.tiff", side=2048, seed=i)] for i in range(N_SLIDES)]
    sheet = write_sheet(folder / "slides.tsv", rows)
    clinical = write_clinical(folder / "clinical.tsv", [[f"P{i}", str(10 + i), str(i % 2)] for i in range(N_SLIDES)])
    return ["--configfile", "crash.yaml", "--config", f"slides={sheet}", f"clinical={clinical}"]


def workflow(path: Path) -> Path:
    copy_workflow(path)
    (path / "crash.yaml").write_text(CONFIG)
    return path


def processes_in(folder: Path) -> list[int]:
    """Processes whose working directory is inside ``folder`` (a job that outlived the kill would show here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd == str(folder) or cwd.startswith(f"{folder}/"):
                found.append(int(entry.name))
    return found


def final_files(workdir: Path) -> dict[str, Path]:
    """Every output at its final path (hidden files, i.e. temporaries and the .finished links, left out)."""
    out = {}
    for sub in ("tiles", "qc", "embeddings", "zeroshot"):
        for path in sorted((workdir / "results" / sub).rglob("*")):
            relative = path.relative_to(workdir)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                out[str(relative)] = path
    return out


def assert_valid(files: dict[str, Path]) -> None:
    """Every file that exists is whole: Parquet footers read, PNGs decode, TSVs end with a newline."""
    for name, path in files.items():
        if name.endswith(".parquet"):
            pq.read_table(path)
            read_metadata(path)
        elif name.endswith(".png"):
            with Image.open(path) as image:
                image.load()
        elif name.endswith(".tsv"):
            assert path.read_text().endswith("\n"), name


def leftovers(workdir: Path) -> list[str]:
    return sorted(str(p.relative_to(workdir)) for p in (workdir / "results").rglob(".*.tmp"))


@pytest.fixture(scope="module")
def uninterrupted(cohort, tmp_path_factory) -> tuple[Path, Path]:
    """(where to run, the uninterrupted run's results): both runs use the same folder, one after the other,
    because outputs record the absolute path of the model config they were made with."""
    base = tmp_path_factory.mktemp("crash")
    workdir = workflow(base / "run")
    snakemake(workdir, *TARGETS, *cohort)
    return workdir, workdir.rename(base / "reference")


def test_killed_during_tiling_and_embedding_then_rerun_equals_an_uninterrupted_run(cohort, uninterrupted):
    run, uninterrupted = uninterrupted
    workdir = workflow(run)
    tiles = workdir / "results" / "tiles"
    embeddings = workdir / "results" / "embeddings" / "tiny"

    # 1. killed as soon as the first tile file appears: the other tile jobs are mid-way
    assert kill_when(workdir, [*TARGETS, *cohort], lambda: tiles.is_dir() and any(tiles.glob("*.parquet")))
    time.sleep(0.5)
    assert processes_in(workdir) == [], "a job outlived the kill of its process group"
    written = final_files(workdir)
    assert 1 <= len(list(tiles.glob("*.parquet"))) < N_SLIDES
    assert_valid(written)

    # 2. restarted, and killed again as soon as the first slide's embeddings are written (the shard job is
    # mid-way through the next slide)
    snakemake(workdir, "--unlock", *cohort)
    first = lambda: embeddings.is_dir() and any(embeddings.glob("*.parquet"))  # noqa: E731
    assert kill_when(workdir, ["--rerun-incomplete", *TARGETS, *cohort], first)
    time.sleep(0.5)
    assert processes_in(workdir) == []
    assert len(list(tiles.glob("*.parquet"))) == N_SLIDES
    assert 1 <= len(list(embeddings.glob("*.parquet"))) < N_SLIDES
    assert_valid(final_files(workdir))

    # 3. re-run to the end
    snakemake(workdir, "--unlock", *cohort)
    snakemake(workdir, "--rerun-incomplete", *TARGETS, *cohort)
    shard_log = (workdir / "results/logs/embed/tiny/shard00000.log").read_text()
    assert "reusing 1 finished slide(s)" in shard_log or "reusing 2 finished slide(s)" in shard_log

    resumed, reference = final_files(workdir), final_files(uninterrupted)
    assert sorted(resumed) == sorted(reference)
    assert len([n for n in resumed if n.startswith("results/embeddings/") and n.endswith(".parquet")]) == N_SLIDES
    assert_valid(resumed)
    different = [name for name in reference if resumed[name].read_bytes() != reference[name].read_bytes()]
    assert different == [], f"outputs differ from the uninterrupted run: {different}"
    assert leftovers(workdir) == [], "temporary files of the killed writes were left behind"
    assert snakemake(workdir, "-n", *TARGETS, *cohort).stdout.count("Nothing to be done") == 1
