"""A model without a text tower (a timm encoder such as UNI) in the plan: the default target makes what it can
for it (embeddings, slide embeddings, numbered phenotypes, clustering, slide neighbours, few-shot on the sheet's
labels) and says once what it leaves out; asking for a zero-shot output of it is refused with a line that names
the model. Dry runs only: planning opens no slide and loads no model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from bad_slides import copy_workflow, snakemake

timm = pytest.importorskip("timm")  # a dependency of open_clip_torch: always installed


@pytest.fixture(scope="module")
def image_only_run(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("image_only")
    workdir = copy_workflow(root / "wf")
    folder = root / "UNI"
    folder.mkdir()
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architecture": "vit_tiny_patch16_224",
                "num_classes": 0,
                "pretrained_cfg": {
                    "input_size": [3, 224, 224],
                    "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225],
                },
            }
        )
    )
    (root / "one.tiff").write_bytes(b"II*\x00")
    (root / "slides.tsv").write_text(
        "slide_id\tpatient_id\tpath\tlabel\tsplit\n"
        + "".join(f"S{i}\tP{i}\tone.tiff\t{('LUSC', 'LUAD')[i % 2]}\t{('test', 'train')[i < 2]}\n" for i in range(4))
    )
    (root / "clinical.tsv").write_text("patient_id\ttime\tevent\n" + "".join(f"P{i}\t{i + 1}\t1\n" for i in range(4)))
    (root / "uni.yaml").write_text(
        f"slides: {root / 'slides.tsv'}\nclinical: {root / 'clinical.tsv'}\n"
        f"models:\n  uni:\n    backend: timm\n    model: {folder}\n"
        "embedding:\n  models: [uni]\nzeroshot:\n  prompt_sets: [nsclc]\n"
        "survival:\n  multivariable: ['phenotypes']\n  km_groupings: [cluster]\n"
    )
    return workdir, ["--configfile", str(root / "uni.yaml")]


def planned_rules(output: str) -> set[str]:
    table = output[output.index("Job stats:") :]
    return {m[1] for m in re.finditer(r"^(\w+)\s+\d+$", table, flags=re.M)} - {"total", "all"}


def test_default_target_leaves_text_outputs_out_and_says_so(image_only_run):
    workdir, config = image_only_run
    result = snakemake(workdir, "-n", *config)
    output = result.stdout + result.stderr
    rules = planned_rules(output)
    assert {"embed_uni_shard00000", "aggregate", "phenotypes", "cluster_slides", "slide_neighbours"} <= rules
    assert {"qupath_uni_shard00000", "slides_anndata"} <= rules  # exports: phenotypes only, no scores, no classes
    assert "survival" in rules  # phenotype and cluster terms need no text
    assert "fewshot_labels" in rules  # prototype and probe need no text: the sheet's labels, no zero-shot line
    assert "results/fewshot/uni/labels/summary.tsv" in output
    assert not rules & {"encode_prompts", "zeroshot", "prompt_sensitivity", "fewshot", "retrieve_tiles"}
    assert not any(rule.startswith("zeroshot_evidence") for rule in rules)
    assert len(re.findall(r"model uni \(backend timm\) has no text tower", output)) == 1


def test_asking_for_a_zero_shot_output_names_the_model(image_only_run):
    workdir, config = image_only_run
    result = snakemake(workdir, "-n", "results/zeroshot/uni/nsclc/calls.tsv", *config, check=False)
    assert result.returncode != 0
    assert "model 'uni' (backend timm) has no text tower" in result.stdout + result.stderr


def test_survival_terms_that_read_calls_are_refused_for_it(image_only_run, tmp_path):
    workdir, config = image_only_run
    (tmp_path / "calls.yaml").write_text("survival:\n  multivariable: ['subtype:LUSC']\n  km_groupings: []\n")
    both = [*config, str(tmp_path / "calls.yaml")]  # --configfile takes several files; a second flag would replace
    result = snakemake(workdir, "-n", *both)
    assert "survival" not in planned_rules(result.stdout + result.stderr)
    asked = snakemake(workdir, "-n", "results/survival/uni/cindex.tsv", *both, check=False)
    assert asked.returncode != 0 and "has no text tower" in asked.stdout + asked.stderr
