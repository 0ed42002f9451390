"""A real cohort from the README's instructions: config/config.yaml copied and filled in, no demo stage planned,
every stage left out said so once; and each checkout of the workflow running its own library."""

from __future__ import annotations

import os
import re

import pytest
import yaml
from bad_slides import REPO, copy_workflow, good_slide, snakemake, write_sheet

from histoclip.config import load_yaml

DEMO_RULES = ("demo_cohort", "demo_training_pairs", "train_clip")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, shared_data):
    """A workflow copy, a sheet of a real Aperio slide and a made one (no labels, no split), and the template
    config filled in as the README says: slides, a model, a prompt set."""
    workdir = copy_workflow(tmp_path_factory.mktemp("real"))
    slides = workdir / "slides"
    slides.mkdir()
    made = good_slide(slides / "made.tiff")
    sheet = write_sheet(
        workdir / "cohort.tsv", [["cmu1", "P1", shared_data / "svs" / "CMU-1-Small-Region.svs"], ["made", "P2", made]]
    )
    config = load_yaml(workdir / "config" / "config.yaml")
    config["slides"] = str(sheet)
    config["models"]["main"]["model"] = "config/models/tiny-vit.json"
    config["zeroshot"]["prompt_sets"] = ["nsclc"]
    (workdir / "my_cohort.yaml").write_text(yaml.safe_dump(config))
    return workdir


def planned_rules(output: str) -> set[str]:
    """Rule names of the job table Snakemake prints for a dry run."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {line.split()[0] for line in table.splitlines()[2:] if line.strip()}


def test_a_real_cohort_from_the_template_plans_no_demo_stage_and_says_what_it_leaves_out(cohort):
    result = snakemake(cohort, "-n", "--configfile", "my_cohort.yaml", demo=False)
    rules = planned_rules(result.stdout)
    assert not rules & set(DEMO_RULES), rules
    assert {"tile_shard00000", "zeroshot", "phenotypes", "cluster_slides"} <= rules | {"tile_shard00000"}, rules
    assert "embed_main_shard00000" in rules, rules
    notes = re.findall(r"left out of the default target: ([^:]+):", result.stderr)
    assert notes == [
        "text → tile retrieval galleries",
        "survival (Cox models, Kaplan–Meier curves, c-index, image + clinical c-index)",
        "slide–report alignment (report retrieval, report-style zero-shot)",
        "confusion/ROC figures, prompt sensitivity and few-shot",
        "MIL (ABMIL and mean pooling)",
        "site audit",
    ], result.stderr
    assert "has no `label` values" in result.stderr and "no clinical table (set `clinical`)" in result.stderr
    assert "mil.tasks is empty" in result.stderr and "has no `site` values" in result.stderr


def test_the_template_unfilled_stops_the_run_naming_the_key(cohort):
    result = snakemake(cohort, "-n", "--config", f"slides={cohort / 'cohort.tsv'}", demo=False, check=False)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "models.main.model: is not set" in out and "config (config/config.yaml" in out


@pytest.mark.integration
def test_each_checkout_runs_its_own_library(tmp_path):
    """Two checkouts: this one (installed editable into the environment, and put first by PYTHONPATH too) and a
    copy. Every job of a run in the copy imports the copy's histoclip: its src/histoclip/__init__.py writes a
    mark per process, so a job that imported this checkout's would leave none."""
    other = copy_workflow(tmp_path / "other")
    init = other / "src" / "histoclip" / "__init__.py"
    init.write_text(
        init.read_text() + "\nimport os as _os  # noqa: E402\n\n"
        "with open(_os.path.join(_os.environ['HISTOCLIP_IMPORT_LOG'], str(_os.getpid())), 'a') as _f:\n"
        "    _f.write(__file__ + '\\n')\n"
    )
    marks = tmp_path / "marks"
    marks.mkdir()
    slides = [good_slide(tmp_path / f"{name}.tiff", seed=i) for i, name in enumerate("ab")]
    sheet = write_sheet(tmp_path / "s.tsv", [["a", "P1", slides[0]], ["b", "P2", slides[1]]])
    (other / "tiny.yaml").write_text("embedding:\n  models: [tiny]\nzeroshot:\n  prompt_sets: [nsclc]\n")
    env = {"HISTOCLIP_IMPORT_LOG": str(marks), "PYTHONPATH": str(REPO / "src")}
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        result = snakemake(
            other,
            "results/qc/cohort.tsv",
            "results/zeroshot/tiny/nsclc/calls.tsv",
            "--configfile",
            "tiny.yaml",
            "--config",
            f"slides={sheet}",
            "clinical=",
        )
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    jobs = int(re.findall(r"(\d+) of \d+ steps \(100%\) done", result.stderr)[-1])
    imported = {line for mark in marks.iterdir() for line in mark.read_text().splitlines()}
    assert imported == {str(init)}
    # every job process (and the planning one) left a mark: none of them imported this checkout's library
    assert len(list(marks.iterdir())) >= jobs + 1, (jobs, sorted(p.name for p in marks.iterdir()))
