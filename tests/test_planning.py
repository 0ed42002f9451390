"""A large cohort is planned as jobs per shard of slides, not per slide (what a cluster's queue and Snakemake's
planning pay for), and a slice of it with --batch plans only that slice. Counts, not times: the time of a
10,000-slide dry run is a benchmark (benchmarks/bench_dag.py), this machine being shared."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bad_slides import copy_workflow, snakemake

N_SLIDES = 230
SHARD = 50
N_SHARDS = 5  # ceil(230 / 50)


@pytest.fixture(scope="module")
def big_cohort(tmp_path_factory) -> tuple[Path, list[str]]:
    """A workflow and a sheet of 230 slides (symbolic links to one file: planning opens no slide)."""
    root = tmp_path_factory.mktemp("planning")
    workdir = copy_workflow(root / "wf")
    (root / "one.tiff").write_bytes(b"II*\x00")
    (root / "slides").mkdir()
    rows, clinical = [], []
    for i in range(N_SLIDES):
        (root / "slides" / f"S{i:04d}.tiff").symlink_to(root / "one.tiff")
        rows.append(f"S{i:04d}\tP{i // 2:04d}\tslides/S{i:04d}.tiff\n")
        if i % 2 == 0:
            clinical.append(f"P{i // 2:04d}\t{i % 37 + 1}\t{i // 2 % 2}\n")
    (root / "slides.tsv").write_text("slide_id\tpatient_id\tpath\n" + "".join(rows))
    (root / "clinical.tsv").write_text("patient_id\ttime\tevent\n" + "".join(clinical))
    # shards of 50 (the schema's default; the demo's config packs its 220 slides into shards of 110)
    (workdir / "shards.yaml").write_text(f"tiling: {{shard_size: {SHARD}}}\nembedding: {{shard_size: {SHARD}}}\n")
    return workdir, [
        "--configfile",
        "shards.yaml",
        "--config",
        f"slides={root / 'slides.tsv'}",
        f"clinical={root / 'clinical.tsv'}",
    ]


def job_counts(output: str) -> dict[str, int]:
    """The `Job stats` table of a dry run: {rule: jobs}."""
    table = output[output.index("Job stats:") :]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)}


def test_default_target_plans_one_job_per_shard(big_cohort):
    workdir, config = big_cohort
    result = snakemake(workdir, "-n", *config)
    jobs = job_counts(result.stdout + result.stderr)
    tiling = {rule for rule in jobs if rule.startswith("tile_")}
    embedding = {rule for rule in jobs if rule.startswith("embed_")}
    qupath = {rule for rule in jobs if rule.startswith("qupath_")}
    assert tiling == {f"tile_shard{i:05d}" for i in range(N_SHARDS)}
    assert embedding == {f"embed_demo_shard{i:05d}" for i in range(N_SHARDS)}
    assert qupath == {f"qupath_demo_shard{i:05d}" for i in range(N_SHARDS)}
    assert all(jobs[rule] == 1 for rule in tiling | embedding | qupath)
    # evidence figures: one job per model and prompt set, for a bounded selection of slides (figures.evidence)
    assert jobs["zeroshot_evidence"] == 1
    # everything else is per model / prompt set / cohort: a fixed number of jobs, whatever the cohort's size
    per_cohort = jobs["total"] - 3 * N_SHARDS
    assert per_cohort < 50, jobs


def test_cohort_wide_rules_read_shard_tables_not_slide_files(big_cohort):
    """cohort_qc and the embedding manifest wait for one table per shard, not for one file per slide."""
    workdir, config = big_cohort
    detail = snakemake(workdir, "-n", "results/qc/cohort.tsv", "results/embeddings/demo.tsv", *config)
    text = detail.stdout + detail.stderr
    block = text[text.index("rule cohort_qc:") :].split("\n\n", 1)[0]
    inputs = re.search(r"input: (.*)", block)[1].split(", ")
    assert inputs == [f"results/qc/shards/shard{i:05d}.tsv" for i in range(N_SHARDS)]
    block = text[text.index("rule embedding_manifest:") :].split("\n\n", 1)[0]
    inputs = re.search(r"input: (.*)", block)[1].split(", ")
    assert inputs == [f"results/embeddings/demo/shards/shard{i:05d}.tsv" for i in range(N_SHARDS)]


def test_batch_plans_one_slice_of_the_shards(big_cohort):
    workdir, config = big_cohort
    result = snakemake(workdir, "-n", "results/qc/cohort.tsv", "--batch", "cohort_qc=2/5", *config)
    jobs = job_counts(result.stdout + result.stderr)
    assert set(jobs) == {"tile_shard00001", "total"}, jobs
