"""Determinism: two runs of the (reduced) demo with the same config give byte-identical outputs.

The demo is the whole pipeline on synthetic data: the cohort is generated, a CLIP is trained on it, every slide
tiled and embedded, slides called zero-shot and, where the stage exists, survival models fitted. Both runs use
the same folder one after the other (outputs record absolute paths of what they were made from), on the CPU.
Every random choice takes its seed from the config; a different ``demo.seed`` gives a different cohort.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_slides import REPO, copy_workflow, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.integration]

#: The demo, reduced to run in about a minute on 2 idle cores (65 CPU-seconds): 9 slides of 1024 px, a 5-step CLIP.
REDUCED = """\
demo:
  n_patients: 8
  extra_slides: 1
  slide_px: 1024
training:
  demo-clip:
    steps: 5
    batch_size: 16
embedding:
  device: cpu
"""
HAS_SURVIVAL = (REPO / "rules" / "survival.smk").exists()
TARGETS = [
    "results/qc/cohort.tsv",
    "results/zeroshot/demo/demo/calls.tsv",
    *(["results/survival/demo/cindex.tsv"] if HAS_SURVIVAL else []),
]
#: What must be byte-identical: (folder, glob).
COMPARED = [
    ("results/demo", "*.tsv"),
    ("results/demo/slides", "*.tiff"),
    ("results/models/demo-clip", "open_clip_model.safetensors"),
    ("results/tiles", "*.parquet"),
    ("results/qc", "cohort.tsv"),
    ("results/embeddings/demo", "*.parquet"),
    ("results/zeroshot/demo/demo", "calls.tsv"),
    *([("results/survival", "**/*.tsv")] if HAS_SURVIVAL else []),
]


def run_demo(workdir: Path) -> Path:
    copy_workflow(workdir)
    (workdir / "reduced.yaml").write_text(REDUCED)
    snakemake(workdir, "demo_cohort", "--configfile", "reduced.yaml")
    snakemake(workdir, *TARGETS, "--configfile", "reduced.yaml")
    return workdir


def outputs(workdir: Path) -> dict[str, bytes]:
    found = {}
    for folder, pattern in COMPARED:
        files = sorted((workdir / folder).glob(pattern))
        assert files, f"the run made no {folder}/{pattern}"
        found |= {str(path.relative_to(workdir)): path.read_bytes() for path in files if path.is_file()}
    return found


def test_two_demo_runs_with_the_same_config_are_byte_identical(tmp_path):
    first = run_demo(tmp_path / "run").rename(tmp_path / "first")
    second = run_demo(tmp_path / "run")
    a, b = outputs(first), outputs(second)
    assert sorted(a) == sorted(b)
    assert sum(name.startswith("results/tiles/") for name in a) == 9
    different = [name for name in a if a[name] != b[name]]
    assert different == [], f"differ between two runs with the same config: {different}"

    # the seed is in the config, and it is what decides: another demo.seed, another cohort
    other = copy_workflow(tmp_path / "other")
    (other / "reduced.yaml").write_text(REDUCED.replace("demo:\n", "demo:\n  seed: 1\n"))
    snakemake(other, "demo_cohort", "--configfile", "reduced.yaml")
    assert (other / "results/demo/clinical.tsv").read_bytes() != a["results/demo/clinical.tsv"]
