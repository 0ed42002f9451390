"""The preflight (histoclip.preflight, `histoclip check`, rule check): what it measures on good input, how its
table is laid out, and its model checks. The bad-input cases themselves are in test_bad_inputs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from bad_slides import corrupt_tiles_slide, good_slide, truncated_slide, write_clinical, write_sheet

from histoclip import cli
from histoclip.config import default_config
from histoclip.preflight import (
    COLUMNS,
    SlideSettings,
    architecture_shapes,
    check_model,
    check_outputs,
    check_sheet,
    check_slides,
    checkpoint_shapes,
    fit_problems,
    run_preflight,
    write_report,
)
from histoclip.sheets import SlideRecord

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = REPO / "config" / "models" / "tiny-vit.json"


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    good_slide(folder / "a.tiff", side=1024, seed=1)
    good_slide(folder / "b.tiff", side=2048, seed=2, mpp=0.125)  # "80x": 0.5 µm/px tiles come from level 1
    truncated_slide(folder / "cut.tiff")
    corrupt_tiles_slide(folder / "corrupt.tiff")
    return folder


@pytest.fixture(scope="module")
def tiny_state():
    from histoclip.embedding.models import ModelSpec, load_model

    return load_model(ModelSpec("tiny", str(TINY_VIT), seed=0), "cpu").model.state_dict()


def config_for(tmp: Path, slides: Path, rows=None, **extra):
    rows = rows or [["a", "P1", slides / "a.tiff"], ["b", "P2", slides / "b.tiff"]]
    config = {
        "slides": str(write_sheet(tmp / "slides.tsv", rows)),
        "clinical": str(write_clinical(tmp / "clinical.tsv", [["P1", "5", "1"], ["P2", "7", "0"]])),
        "embedding": {"models": []},
        "zeroshot": {"prompt_sets": ["nsclc"]},
    }
    return config | extra


def test_good_cohort_has_no_problem_and_the_slide_table_says_what_the_run_will_do(tmp_path, slides):
    report = run_preflight(config_for(tmp_path, slides), search_dirs=[REPO], results_dir=tmp_path / "results")
    assert report.problems == [] and report.ok
    table = report.slide_table().set_index("slide_id")
    assert list(table.index) == ["a", "b"] and (table["status"] == "ok").all()
    assert table.loc["a", "level0_mpp"] == pytest.approx(0.5) and table.loc["a", "mpp_source"] == "openslide-metadata"
    assert table.loc["b", "level0_mpp"] == pytest.approx(0.125)
    # what tiling will choose (levels are 1, 4 and 16x down): 0.5 µm/px tiles read from level 0 of a and from
    # level 1 of b (0.5 µm/px); tissue detection at 8 µm/px reads level 2 of both (8 and 2 µm/px, the nearest)
    assert table.loc["a", "read_level"] == 0 and table.loc["b", "read_level"] == 1
    assert table.loc["a", "tissue_level"] == 2 and table.loc["b", "tissue_level"] == 2
    assert table.loc["b", "tissue_level_mb"] == pytest.approx(128 * 128 * 4 / 2**20)


def test_table_is_one_line_per_problem_errors_first(tmp_path, slides):
    rows = [
        ["a", "P1", slides / "a.tiff"],
        ["cut", "P2", slides / "cut.tiff"],
        ["corrupt", "P3", slides / "corrupt.tiff"],
        ["../x", "P4", slides / "a.tiff"],
    ]
    config = config_for(tmp_path, slides, rows, tiling={"tile_size": 1})
    report = run_preflight(config, search_dirs=[REPO], results_dir=tmp_path / "results")
    assert not report.ok
    write_report(report, tmp_path / "results/preflight.tsv", tmp_path / "results/slides.tsv")
    lines = (tmp_path / "results/preflight.tsv").read_text().splitlines()
    assert lines[0].split("\t") == list(COLUMNS)
    assert len(lines) == 1 + len(report.problems)  # no message spills over lines
    table = pd.read_csv(tmp_path / "results/preflight.tsv", sep="\t", keep_default_na=False)
    assert list(table["severity"]) == sorted(table["severity"], key=["error", "skip", "warning"].index)
    errors = table[table["severity"] == "error"]
    assert list(errors["what"]) == ["config", "sheet", "slide", "slide"]  # subjects in a fixed order
    assert set(errors["slide_id"]) == {"", "cut", "corrupt"}
    assert (errors["fix"] != "").all()
    # the valid rows' slides were still checked although the sheet has a bad row
    assert list(pd.read_csv(tmp_path / "results/slides.tsv", sep="\t")["slide_id"]) == ["a", "cut", "corrupt"]


def test_threads_give_the_same_checks_in_sheet_order(slides):
    records = [SlideRecord(f"s{i}", "P", slides / name) for i, name in enumerate(["a.tiff", "cut.tiff", "b.tiff"] * 4)]
    serial = check_slides(records, SlideSettings.from_config(default_config()), threads=1)
    threaded = check_slides(records, SlideSettings.from_config(default_config()), threads=4)
    strip = [(c.slide_id, c.status, c.level0_mpp, c.read_level, [p.problem for p in c.problems]) for c in serial]
    assert strip == [
        (c.slide_id, c.status, c.level0_mpp, c.read_level, [p.problem for p in c.problems]) for c in threaded
    ]
    assert [c.status for c in serial[:3]] == ["ok", "error", "ok"]


def test_checking_many_linked_slides(tmp_path, slides):
    """Speed is measured by benchmarks/bench_preflight.py (about 6 ms per slide here), not asserted."""
    (tmp_path / "links").mkdir()
    rows = []
    for i in range(200):
        (tmp_path / "links" / f"s{i}.tiff").symlink_to(slides / ("a.tiff" if i % 2 else "b.tiff"))
        rows.append([f"s{i}", f"P{i}", f"links/s{i}.tiff"])
    records, problems = check_sheet(write_sheet(tmp_path / "sheet.tsv", rows))
    assert len(records) == 200 and problems == []
    checks = check_slides(records, SlideSettings.from_config(default_config()), threads=2)
    assert [check.slide_id for check in checks] == [f"s{i}" for i in range(200)]
    assert all(check.status == "ok" for check in checks)


def test_record_policy_turns_slide_errors_into_skips(tmp_path, slides):
    rows = [["a", "P1", slides / "a.tiff"], ["cut", "P2", slides / "cut.tiff"]]
    report = run_preflight(
        config_for(tmp_path, slides, rows, on_slide_error="record"), search_dirs=[REPO], results_dir=tmp_path / "r"
    )
    assert report.ok and report.count("skip") == 1 and report.count("error") == 0
    assert report.slide_table().set_index("slide_id").loc["cut", "status"] == "skip"


# --- models ---------------------------------------------------------------------------------------------------------


def test_checkpoint_shapes_come_from_the_header_and_fit_the_architecture(tmp_path, tiny_state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_state.items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_state.items()}}, tmp_path / "w.pt")
    expected = {k: tuple(v.shape) for k, v in tiny_state.items()}
    assert checkpoint_shapes(tmp_path / "w.safetensors") == expected
    assert checkpoint_shapes(tmp_path / "w.pt") == expected  # state_dict wrapper and module. prefix undone
    from histoclip.embedding.backends.open_clip_backend import register_json_config
    from histoclip.embedding.models import ModelSpec

    name = register_json_config(TINY_VIT, ModelSpec("tiny", str(TINY_VIT)))
    built, custom_text = architecture_shapes(name)
    assert built == expected and not custom_text
    for weights in ("w.safetensors", "w.pt"):
        entry = {"model": str(TINY_VIT), "pretrained": str(tmp_path / weights)}
        assert check_model("tiny", entry, {"training": {}}) == []


def test_fit_problems_name_missing_unexpected_and_reshaped_tensors():
    expected = {"a": (4, 2), "b": (3,), "positional_embedding": (50, 8), "logit_bias": ()}
    assert fit_problems(expected, {"a": (4, 2), "b": (3,), "positional_embedding": (197, 8)}) == []
    problems = fit_problems(expected, {"a": (4, 3), "c": (1,), "positional_embedding": (50, 8)})
    assert problems == [
        "1 tensor(s) missing (e.g. b)",
        "1 unexpected tensor(s) (e.g. c)",
        "1 shape mismatch(es) (e.g. a: [4, 3] in the file, [4, 2] in the model)",
    ]


def test_a_model_the_workflow_trains_is_checked_through_its_training_entry(tmp_path):
    config = {
        "training": {"mine": {"pairs": "results/demo/training_pairs.tsv", "base": str(TINY_VIT)}},
        "models": {"m": {"model": "local-dir:results/models/mine"}},
    }
    entry = config["models"]["m"]
    assert check_model("m", entry, config, [tmp_path]) == []  # not trained yet: it will be
    config["training"]["mine"] = {"pairs": str(tmp_path / "pairs.tsv"), "base": "nope.json"}
    problems = check_model("m", entry, config, [tmp_path])
    assert [p.where for p in problems] == ["config training.mine.base", "config training.mine.pairs"]


def test_a_results_folder_that_cannot_be_written_is_an_error(tmp_path):
    (tmp_path / "file").write_text("")
    problems = check_outputs(tmp_path / "file" / "results")
    assert [p.what for p in problems] == ["output"] and "cannot be written" in problems[0].problem
    assert check_outputs(tmp_path / "results") == []


# --- the command line -----------------------------------------------------------------------------------------------


def test_cli_merges_config_like_snakemake_and_exits_by_severity(tmp_path, slides, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    # config/config.yaml as the real-cohort template ships it: the model's weights left for the user to name
    (tmp_path / "config" / "config.yaml").write_text("models:\n  main: {model: null}\nembedding: {models: [main]}\n")
    sheet = write_sheet(tmp_path / "s.tsv", [["a", "P1", slides / "a.tiff"]])
    assert cli.main(["check", "--config", f"slides={sheet}", "clinical="]) == 1
    table = pd.read_csv(tmp_path / "results/preflight.tsv", sep="\t", keep_default_na=False)
    assert table.loc[0, "where"] == "models.main.model" and "is not set" in table.loc[0, "problem"]
    assert "hf-hub:" in table.loc[0, "fix"] and "local-dir:" in table.loc[0, "fix"]
    capsys.readouterr()
    # a --configfile replaces config/config.yaml whole (as the Snakefile has Snakemake do): its unset model is gone;
    # several files merge in order, --config last
    (tmp_path / "base.yaml").write_text("embedding:\n  models: []\nzeroshot:\n  prompt_sets: [nsclc]\n")
    (tmp_path / "over.yaml").write_text(json.dumps({"tiling": {"tile_px": 112}}))
    args = ["check", "--configfile", "base.yaml", "over.yaml", "--config", f"slides={sheet}", "clinical="]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "1 slide(s) checked" in out and "0 error(s)" in out
    assert (tmp_path / "results/preflight.tsv").read_text().splitlines() == ["\t".join(COLUMNS)]
    # an override that breaks the config: exit 1, and the table says which key
    assert cli.main([*args, "seed=abc"]) == 1
    table = pd.read_csv(tmp_path / "results/preflight.tsv", sep="\t", keep_default_na=False)
    assert table.loc[0, "where"] == "seed" and "not of type 'integer'" in table.loc[0, "problem"]
    assert "ERROR [config] seed" in capsys.readouterr().err
    # a config file that is not a mapping: a usage error
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert cli.main(["check", "--configfile", "list.yaml"]) == 2
