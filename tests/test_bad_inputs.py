"""The bad-input matrix: one case per way a cohort's input goes wrong, each refused early and clearly.

Every case runs ``histoclip check`` (the preflight, in-process through its command line) on a cohort that is
good except for that one fault, and asserts what a user would check: the exit status (1 when the run would
fail, 0 when the fault is a warning or a slide that ``on_slide_error: record`` skips), and a line of
results/preflight.tsv that names the file / row / column or slide, the problem, and the fix.

What the run itself does with the same fault (the library call the rule makes) is tested where the case is
owned, and not repeated here:

| case | the run's behaviour is tested in |
|---|---|
| slide-unopenable, slide-unreadable-svs, slide-not-a-wsi | test_slide_tiling::test_broken_slides_fail_or_are_recorded |
| slide-multiplex-qptiff, slide-text-named-svs, slide-plain-image | test_readers (the diagnoses, exact messages) |
| slide-missing-mpp, slide-absurd-mpp-metadata, sheet-absurd-mpp | test_slide_tiling (mpp policy tests) |
| slide-undecodable-tiles | test_undecodable_tiles_fail_the_embedding_job_and_keep_other_slides (below, Snakemake) |
| slide-truncated, slide-no-tissue | this file (run_tiling tests below) |
| sheet-* (but case collision) | test_sheets; sheet-case-collision below |
| clinical-negative-time, clinical-bad-event | test_survival_clinical::test_bad_clinical_rows |
| clinical-no-events, clinical-no-shared-ids | this file (read_clinical_table, as the Snakefile calls it) |
| prompts-* | test_prompts::test_bad_files_name_file_and_culprit |
| config-unknown-key, config-wrong-type | test_config, test_workflow::test_unknown_config_key_is_rejected |
| model-missing-weights, model-mismatched-architecture | test_embedding (load_model) |
| model-pickle-with-code | test_safety::test_malicious_pickle_checkpoint_is_refused_without_running_it |
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from bad_slides import (
    blank_slide,
    copy_workflow,
    corrupt_tiles_slide,
    good_slide,
    plain_png,
    single_level_tiled,
    snakemake,
    text_file,
    truncated_slide,
    write_clinical,
    write_sheet,
)
from conftest import require_shared_data

from histoclip import cli
from histoclip.errors import InputError, SlideError
from histoclip.sheets import read_cohort_sheet
from histoclip.store import read_metadata
from histoclip.survival.clinical import read_clinical_table
from histoclip.tiling.grid import run_tiling


def shared() -> Path:
    """../shared/data, or a skip (a failure under CI) when it is missing: see conftest.py."""
    return require_shared_data()


TINY_VIT = Path(__file__).resolve().parents[1] / "config" / "models" / "tiny-vit.json"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two good slides and a clean sheet + clinical table that every case starts from."""
    folder = tmp_path_factory.mktemp("cohort")
    for i in (1, 2):
        good_slide(folder / f"good{i}.tiff", side=1024, seed=i)
    return folder


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A safetensors checkpoint that fits config/models/tiny-vit.json (from its seeded random init)."""
    from safetensors.torch import save_file

    from histoclip.embedding.models import ModelSpec, load_model

    model = load_model(ModelSpec("tiny", str(TINY_VIT), seed=0), "cpu").model
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@dataclass(frozen=True)
class Expect:
    """A line the preflight table must have (every listed fragment in its field) and the exit status."""

    severity: str
    what: str
    where: tuple[str, ...] = ()
    problem: tuple[str, ...] = ()
    fix: tuple[str, ...] = ()
    slide_id: str = ""

    @property
    def status(self) -> int:
        return 1 if self.severity == "error" else 0


def base_config(tmp: Path, cohort: Path, rows: list[list[str]] | None = None) -> dict[str, Any]:
    rows = rows or [["good1", "P1", cohort / "good1.tiff"], ["good2", "P2", cohort / "good2.tiff"]]
    sheet = write_sheet(tmp / "slides.tsv", rows)
    clinical = write_clinical(tmp / "clinical.tsv", [["P1", "10", "1"], ["P2", "20", "0"]])
    return {
        "slides": str(sheet),
        "clinical": str(clinical),
        "embedding": {"models": []},
        "zeroshot": {"prompt_sets": []},
    }


def with_slide(path_maker: Callable[[Path], Path], **sheet_columns: str) -> Callable[..., tuple[dict, Path]]:
    def build(tmp: Path, cohort: Path, **_: Any) -> dict[str, Any]:
        bad = path_maker(tmp)
        rows = [["good1", "P1", cohort / "good1.tiff"], ["bad", "P2", bad]]
        config = base_config(tmp, cohort, rows)
        if sheet_columns:
            header = ("slide_id", "patient_id", "path", *sheet_columns)
            rows = [[*rows[0], ""], [*rows[1], *sheet_columns.values()]]
            write_sheet(Path(config["slides"]), rows, header)
        return config

    return build


def sheet_text(text: str, name: str = "slides.tsv") -> Callable[..., dict[str, Any]]:
    def build(tmp: Path, cohort: Path, **_: Any) -> dict[str, Any]:
        config = base_config(tmp, cohort)
        (tmp / name).write_text(text.format(good1=cohort / "good1.tiff", good2=cohort / "good2.tiff"))
        config["slides"] = str(tmp / name)
        return config

    return build


def clinical_text(text: str) -> Callable[..., dict[str, Any]]:
    def build(tmp: Path, cohort: Path, **_: Any) -> dict[str, Any]:
        config = base_config(tmp, cohort)
        Path(config["clinical"]).write_text(text)
        return config

    return build


def prompts(text: str, labels: bool = False) -> Callable[..., dict[str, Any]]:
    def build(tmp: Path, cohort: Path, **_: Any) -> dict[str, Any]:
        rows = [["good1", "P1", cohort / "good1.tiff", "LUAD"], ["good2", "P2", cohort / "good2.tiff", "mesothelioma"]]
        config = base_config(tmp, cohort)
        if labels:
            write_sheet(Path(config["slides"]), rows, ("slide_id", "patient_id", "path", "label"))
        if text:
            (tmp / "set.yaml").write_text(text)
            config["zeroshot"] = {"prompt_sets": [str(tmp / "set.yaml")]}
        else:
            config["zeroshot"] = {"prompt_sets": ["nsclc"] if labels else ["no-such-set"]}
        return config

    return build


def config_change(change: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    def build(tmp: Path, cohort: Path, **_: Any) -> dict[str, Any]:
        return base_config(tmp, cohort) | change

    return build


def model(make: Callable[[Path, Path], dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def build(tmp: Path, cohort: Path, tiny_weights: Path, **_: Any) -> dict[str, Any]:
        config = base_config(tmp, cohort)
        config["models"] = {"m": make(tmp, tiny_weights)}
        config["embedding"] = {"models": ["m"]}
        return config

    return build


def wider_config(tmp: Path, weights: Path) -> dict[str, Any]:
    spec = json.loads(TINY_VIT.read_text())
    spec["vision_cfg"]["width"] = 96
    (tmp / "wider.json").write_text(json.dumps(spec))
    return {"model": str(tmp / "wider.json"), "pretrained": str(weights)}


def truncated_weights(tmp: Path, weights: Path) -> dict[str, Any]:
    data = weights.read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return {"model": str(TINY_VIT), "pretrained": str(tmp / "cut.safetensors")}


def pickle_with_code(tmp: Path, weights: Path) -> dict[str, Any]:
    import os

    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'PWNED'}",))

    torch.save({"state_dict": {"x": Payload()}}, tmp / "evil.pt")
    return {"model": str(TINY_VIT), "pretrained": str(tmp / "evil.pt")}


PROMPT_OK = 'templates: ["an H&E image of CLASSNAME."]\nclasses:\n  LUAD: ["adenocarcinoma"]\n'

CASES: dict[str, tuple[Callable[..., dict[str, Any]], Expect]] = {
    # --- slides -----------------------------------------------------------------------------------------------
    "slide-unopenable": (
        with_slide(lambda tmp: shared() / "broken" / "openslide-python-unopenable.tiff"),
        Expect("error", "slide", ("slide 'bad'", "unopenable.tiff"), ("Unsupported TIFF compression",), ("re-export",)),
    ),
    "slide-unreadable-svs": (
        with_slide(lambda tmp: shared() / "broken" / "openslide-python-unreadable.svs"),
        Expect("error", "slide", ("slide 'bad'",), ("cannot be decoded", "Bogus marker length"), ("corrupt",)),
    ),
    "slide-undecodable-tiles": (
        with_slide(lambda tmp: corrupt_tiles_slide(tmp / "corrupt.tiff")),
        Expect("error", "slide", ("slide 'bad'", "corrupt.tiff"), ("level 0", "cannot be decoded"), ("corrupt",)),
    ),
    "slide-truncated": (
        with_slide(lambda tmp: truncated_slide(tmp / "cut.tiff", 0.9)),
        Expect("error", "slide", ("slide 'bad'",), ("is truncated", "bytes"), ("copy the slide again",)),
    ),
    "slide-truncated-record-policy": (
        lambda tmp, cohort, **_: (
            with_slide(lambda t: truncated_slide(t / "cut.tiff", 0.9))(tmp, cohort) | {"on_slide_error": "record"}
        ),
        Expect("skip", "slide", ("slide 'bad'",), ("is truncated",), ("on_slide_error: record",), slide_id="bad"),
    ),
    "slide-not-a-wsi": (  # fluorescence: said so, no advice to convert
        with_slide(lambda tmp: shared() / "tiff" / "pathml-smalltif.tif"),
        Expect(
            "error",
            "slide",
            ("slide 'bad'",),
            ("this workflow reads brightfield RGB slides; found 1 channel of uint16",),
            ("remove it from the cohort sheet",),
        ),
    ),
    "slide-multiplex-qptiff": (
        with_slide(lambda tmp: shared() / "qptiff" / "pathml-small_vectra.qptiff"),
        Expect("error", "slide", ("slide 'bad'",), ("brightfield RGB slides; found 3 channels of uint8",), ()),
    ),
    "slide-text-named-svs": (
        with_slide(lambda tmp: text_file(tmp / "slide.svs")),
        Expect("error", "slide", ("slide 'bad'",), ("is not an image at all: it is a text file",), ("slide image",)),
    ),
    "slide-plain-image": (
        with_slide(lambda tmp: plain_png(tmp / "photo.png")),
        Expect(
            "error",
            "slide",
            ("slide 'bad'", "photo.png"),
            ("is a PNG image, not a whole-slide format",),
            ("histoclip convert",),
        ),
    ),
    "slide-single-level-large": (
        with_slide(lambda tmp: single_level_tiled(tmp / "flat.tiff", 8704)),
        Expect("warning", "slide", ("slide 'bad'",), ("has no pyramid", "level 0 whole", "8704×8704"), ("mem_mb",)),
    ),
    "slide-missing-mpp": (
        with_slide(lambda tmp: good_slide(tmp / "nompp.tiff", mpp=None)),
        Expect("error", "slide", ("slide 'bad'",), ("no usable microns-per-pixel",), ("'mpp' column",)),
    ),
    "slide-absurd-mpp-metadata": (
        with_slide(lambda tmp: shared() / "synthetic" / "openslide-python-boxes.tiff"),
        Expect("error", "slide", ("slide 'bad'",), ("no usable microns-per-pixel", "352.8"), ("'mpp' column",)),
    ),
    "sheet-absurd-mpp": (
        with_slide(lambda tmp: good_slide(tmp / "s.tiff"), mpp="500"),
        Expect("error", "slide", ("slide 'bad'",), ("outside the plausible range",), ("mpp.min/mpp.max",)),
    ),
    # --- the cohort sheet ---------------------------------------------------------------------------------------
    "sheet-duplicate-ids": (
        sheet_text("slide_id\tpatient_id\tpath\na\tP1\t{good1}\na\tP2\t{good2}\n"),
        Expect(
            "error", "sheet", ("slides.tsv, line 3", "'slide_id'"), ("duplicate slide id 'a'", "line 2"), ("unique",)
        ),
    ),
    "sheet-case-collision": (
        sheet_text("slide_id\tpatient_id\tpath\nSlide-A\tP1\t{good1}\nslide-a\tP2\t{good2}\n"),
        Expect("error", "sheet", ("line 3", "'slide_id'"), ("only in letter case",), ("regardless of case",)),
    ),
    "sheet-unsafe-id": (
        sheet_text("slide_id\tpatient_id\tpath\n../escape\tP1\t{good1}\n"),
        Expect("error", "sheet", ("line 2", "'slide_id'"), ("'../escape'", "[A-Za-z0-9._-]"), ("file names",)),
    ),
    "sheet-shell-id": (
        sheet_text("slide_id\tpatient_id\tpath\na;rm -rf ~\tP1\t{good1}\n"),
        Expect("error", "sheet", ("line 2", "'slide_id'"), ("'a;rm -rf ~'",), ("only letters",)),
    ),
    "sheet-missing-columns": (
        sheet_text("slide_id\tpath\na\t{good1}\n"),
        Expect("error", "sheet", ("cohort sheet", "slides.tsv"), ("missing required column", "patient_id"), ("add",)),
    ),
    "sheet-empty": (
        sheet_text(""),
        Expect("error", "sheet", ("slides.tsv",), ("is empty",), ("slide_id, patient_id, path",)),
    ),
    "sheet-header-only": (
        sheet_text("slide_id\tpatient_id\tpath\n"),
        Expect("error", "sheet", ("slides.tsv",), ("no rows",), ("at least one row",)),
    ),
    "sheet-missing-file": (
        sheet_text("slide_id\tpatient_id\tpath\na\tP1\tnowhere/a.svs\n"),
        Expect("error", "sheet", ("line 2", "'path'"), ("nowhere/a.svs", "does not exist"), ("relative",)),
    ),
    "sheet-wrong-delimiter": (
        sheet_text("slide_id,patient_id,path\na,P1,{good1}\n"),
        Expect("error", "sheet", ("slides.tsv",), ("missing required column",), ("comma-separated",)),
    ),
    "sheet-same-file-twice": (
        sheet_text("slide_id\tpatient_id\tpath\na\tP1\t{good1}\nb\tP2\t{good1}\n"),
        Expect("warning", "sheet", ("slide 'b'",), ("same file as slide 'a'",), ("path column",), slide_id="b"),
    ),
    # --- the clinical table ---------------------------------------------------------------------------------------
    "clinical-missing-patients": (
        clinical_text("patient_id\ttime\tevent\nP1\t10\t1\n"),
        Expect("warning", "clinical", ("clinical.tsv",), ("patient 'P2'", "good2", "left out"), ("add the patient",)),
    ),
    "clinical-negative-time": (
        clinical_text("patient_id\ttime\tevent\nP1\t-3\t1\nP2\t5\t0\n"),
        Expect("error", "clinical", ("line 2", "'time'"), ("'-3'", "P1"), ("non-negative",)),
    ),
    "clinical-bad-event-code": (
        clinical_text("patient_id\ttime\tevent\nP1\t3\tdead\nP2\t5\t0\n"),
        Expect("error", "clinical", ("line 2", "'event'"), ("'dead'", "not 0 or 1"), ("censorship",)),
    ),
    "clinical-no-events": (
        clinical_text("patient_id\ttime\tevent\nP1\t3\t0\nP2\t5\t0\n"),
        Expect("error", "clinical", ("clinical.tsv", "'event'"), ("no events", "censored"), ("clinical: null",)),
    ),
    "clinical-no-shared-ids": (
        clinical_text("patient_id\ttime\tevent\nTCGA-01\t3\t1\nTCGA-02\t5\t0\n"),
        Expect("error", "clinical", ("clinical.tsv", "'patient_id'"), ("none of the 2 patients", "TCGA-01"), ("same",)),
    ),
    "clinical-censorship-column": (
        clinical_text("patient_id\ttime\tcensorship\nP1\t3\t1\nP2\t5\t0\n"),
        Expect("error", "clinical", ("clinical.tsv",), ("missing required column", "event"), ("1 - censorship",)),
    ),
    # --- prompt sets ------------------------------------------------------------------------------------------------
    "prompts-missing-set": (
        prompts(""),
        Expect("error", "prompts", ("zeroshot.prompt_sets", "no-such-set"), ("not found",), ("add the file",)),
    ),
    "prompts-template-without-placeholder": (
        prompts('templates: ["an H&E image."]\nclasses:\n  A: ["a"]\n  B: ["b"]\n'),
        Expect("error", "prompts", ("set.yaml",), ("no CLASSNAME placeholder",), ("put CLASSNAME",)),
    ),
    "prompts-one-class": (
        prompts(PROMPT_OK),
        Expect("error", "prompts", ("set.yaml",), ("1 called class", "at least 2"), ("add classes",)),
    ),
    "prompts-labels-not-classes": (
        prompts("", labels=True),
        Expect("warning", "prompts", ("nsclc.yaml",), ("label 'mesothelioma'", "not evaluated"), ("class names",)),
    ),
    # --- config -------------------------------------------------------------------------------------------------------
    "config-unknown-key": (
        config_change({"tiling": {"tile_size": 256}}),
        Expect("error", "config", ("tiling",), ("'tile_size' was unexpected",), ("tile_px",)),
    ),
    "config-wrong-type": (
        config_change({"tiling": {"tile_px": "big"}}),
        Expect("error", "config", ("tiling.tile_px",), ("'big' is not of type 'integer'",), ("Tile side",)),
    ),
    "config-bad-policy": (
        config_change({"on_slide_error": "ignore"}),
        Expect("error", "config", ("on_slide_error",), ("'ignore' is not one of",), ("record",)),
    ),
    # --- model weights ------------------------------------------------------------------------------------------------
    "model-missing-weights": (
        model(lambda tmp, w: {"model": str(TINY_VIT), "pretrained": str(tmp / "gone.safetensors")}),
        Expect("error", "model", ("models.m.pretrained",), ("gone.safetensors", "does not exist"), ("local-dir",)),
    ),
    "model-local-dir-without-weights": (
        model(lambda tmp, w: {"model": f"local-dir:{tmp}"}),
        Expect("error", "model", ("models.m",), ("open_clip_config.json does not exist",), ("supply the weights",)),
    ),
    "model-mismatched-architecture": (
        model(wider_config),
        Expect("error", "model", ("models.m",), ("do not fit the architecture", "shape mismatch"), ("pair the",)),
    ),
    "model-truncated-checkpoint": (
        model(truncated_weights),
        Expect("error", "model", ("models.m",), ("cut.safetensors", "cannot be read"), ("copy the file again",)),
    ),
    "model-pickle-with-code": (
        model(pickle_with_code),
        Expect("error", "model", ("models.m.pretrained",), ("evil.pt", "arbitrary code"), (".safetensors",)),
    ),
    "model-hub-not-cached": (
        model(lambda tmp, w: {"model": "hf-hub:wisdomik/QuiltNet-B-32"}),
        Expect("error", "model", ("models.m",), ("not in the Hugging Face cache",), ("huggingface-cli download",)),
    ),
    "model-random-init": (
        model(lambda tmp, w: {"model": str(TINY_VIT)}),
        Expect("warning", "model", ("models.m",), ("randomly initialised", "tests only"), ("pretrained",)),
    ),
}


def run_check(tmp: Path, config: dict[str, Any]) -> tuple[int, pd.DataFrame]:
    (tmp / "case.yaml").write_text(yaml.safe_dump(config))
    status = cli.main(["check", "--directory", str(tmp), "--configfile", str(tmp / "case.yaml"), "--threads", "2"])
    table = pd.read_csv(tmp / "results" / "preflight.tsv", sep="\t", dtype=str, keep_default_na=False)
    return status, table


def test_the_matrix_has_at_least_twenty_cases():
    assert len(CASES) >= 20
    assert {name.split("-")[0] for name in CASES} == {"slide", "sheet", "clinical", "prompts", "config", "model"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_where_and_fix(case, cohort, tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    monkeypatch.chdir(tmp_path)
    build, expect = CASES[case]
    status, table = run_check(tmp_path, build(tmp=tmp_path, cohort=cohort, tiny_weights=tiny_weights))

    def matches(row: pd.Series) -> bool:
        return (
            row["severity"] == expect.severity
            and row["what"] == expect.what
            and all(part in row["where"] for part in expect.where)
            and all(part in row["problem"] for part in expect.problem)
            and all(part in row["fix"] for part in expect.fix)
            and (not expect.slide_id or row["slide_id"] == expect.slide_id)
        )

    assert table.apply(matches, axis=1).any(), f"no line matches {expect}:\n{table.to_string()}"
    assert status == expect.status, table.to_string()
    if expect.what != "config":  # the one fault is the only error: nothing else of the good cohort is blamed
        errors = table[table["severity"] == "error"]
        assert len(errors) <= (1 if expect.severity == "error" else 0), errors.to_string()
    assert not (tmp_path / "PWNED").exists()  # a checkpoint is never unpickled as code
    assert not (tmp_path / "results" / "tiles").exists()  # the preflight writes only its tables


# --- what the run does with the faults that had no test before -------------------------------------------------------


def test_truncated_slide_fails_tiling_saying_truncated_or_is_recorded(tmp_path):
    path = truncated_slide(tmp_path / "cut.tiff", 0.9)
    with pytest.raises(SlideError) as err:
        run_tiling(path, "cut", tmp_path / "t.parquet", tmp_path / "q.png")
    assert "slide 'cut'" in str(err.value) and "is truncated" in str(err.value)
    assert "copy the slide again" in str(err.value)
    assert not (tmp_path / "t.parquet").exists()
    meta = run_tiling(path, "cut", tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="record")
    assert meta["status"] == "error" and "truncated" in read_metadata(tmp_path / "t.parquet")["error"]


def test_truncated_tissue_level_is_named_truncated_not_corrupt(tmp_path):
    # cut inside the coarsest level's data: OpenSlide opens the file (its directories are intact) and fails to
    # decode the coarse level that tissue detection reads
    path = good_slide(tmp_path / "s.tiff", side=2048)
    import tifffile

    with tifffile.TiffFile(path) as tif:
        last = tif.pages[-1]
        end = int(last.dataoffsets[0]) + int(last.databytecounts[0]) // 2
    data = path.read_bytes()
    path.write_bytes(data[:end])
    with pytest.raises(SlideError, match="is truncated"):
        run_tiling(path, "s", tmp_path / "t.parquet", tmp_path / "q.png")


def test_slide_without_tissue_fails_or_is_recorded_never_silently_empty(tmp_path):
    path = blank_slide(tmp_path / "blank.tiff")
    with pytest.raises(SlideError) as err:
        run_tiling(path, "blank", tmp_path / "t.parquet", tmp_path / "q.png")
    message = str(err.value)
    assert "slide 'blank'" in message and "has no tissue tile" in message
    assert "min_tissue_fraction" in message and "on_slide_error: record" in message
    meta = run_tiling(path, "blank", tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="record")
    assert meta["status"] == "error" and "no tissue" in meta["error"]
    assert pq.read_metadata(tmp_path / "t.parquet").num_rows == 0


def test_sheet_ids_differing_only_in_case_are_refused(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    sheet = write_sheet(tmp_path / "s.tsv", [["TCGA-1", "P1", "a.svs"], ["tcga-1", "P2", "a.svs"]])
    with pytest.raises(InputError, match=r"line 3.*'tcga-1' differs from 'TCGA-1' \(line 2\) only in letter case"):
        read_cohort_sheet(sheet)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([["P1", "3", "0"], ["P2", "5", "0"]], "no events: all 2 patients of the cohort are censored"),
        ([["X1", "3", "1"], ["X2", "5", "0"]], "none of the 2 patients of the cohort sheet has a row here"),
    ],
)
def test_clinical_table_useless_for_survival_stops_the_run(tmp_path, rows, expected):
    table = write_clinical(tmp_path / "c.tsv", rows)
    with pytest.raises(InputError) as err:
        read_clinical_table(table, ["P1", "P2"])  # as rules/common.smk calls it, before any job
    assert expected in str(err.value) and str(table) in str(err.value) and "Fix:" in str(err.value)
    # events outside the cohort don't count; without the sheet's patients the table alone is checked
    assert read_clinical_table(write_clinical(tmp_path / "d.tsv", [["P1", "3", "0"], ["Q", "5", "1"]])).table.size


def test_config_clinical_null_from_the_command_line_means_none():
    from histoclip.config import validate_config

    # `snakemake --config clinical=null` hands over the string "null"
    assert validate_config({"clinical": "null"})["clinical"] is None


# --- through Snakemake: non-zero exit, the message, and the other slides' outputs kept -------------------------------


TINY = "embedding:\n  models: [tiny]\n  num_workers: 1\nzeroshot:\n  prompt_sets: [nsclc]\ntiling:\n  tile_px: 112\n"


@pytest.mark.integration
def test_snakemake_check_writes_the_table_and_fails_before_any_job(tmp_path, shared_data):
    workdir = copy_workflow(tmp_path / "wf")
    slides = tmp_path / "slides"
    slides.mkdir()
    rows = [
        ["good", "P1", good_slide(slides / "good.tiff")],
        ["cut", "P2", truncated_slide(slides / "cut.tiff")],
        ["broken", "P3", shared_data / "broken" / "openslide-python-unopenable.tiff"],
        ["nompp", "P4", good_slide(slides / "nompp.tiff", mpp=None)],
    ]
    sheet = write_sheet(tmp_path / "cohort.tsv", rows)
    clinical = write_clinical(tmp_path / "clinical.tsv", [["P1", "1", "1"], ["P2", "2", "0"], ["P3", "3", "1"]])
    (workdir / "tiny.yaml").write_text(TINY)
    config = ["--configfile", "tiny.yaml", "--config", f"slides={sheet}", f"clinical={clinical}"]
    result = snakemake(workdir, "check", *config, check=False)
    assert result.returncode != 0
    assert "3 error(s)" in result.stderr and "results/preflight.tsv" in result.stderr
    table = pd.read_csv(workdir / "results/preflight.tsv", sep="\t", keep_default_na=False)
    errors = table[table["severity"] == "error"]
    assert sorted(errors["slide_id"]) == ["broken", "cut", "nompp"]
    assert (errors["fix"] != "").all() and (errors["where"].str.contains("slide '")).all()
    assert table[table["what"] == "clinical"]["problem"].str.contains("patient 'P4'").any()  # a warning
    slides_table = pd.read_csv(workdir / "results/preflight_slides.tsv", sep="\t").set_index("slide_id")
    assert slides_table.loc["good", "status"] == "ok" and slides_table.loc["good", "level0_mpp"] == 0.5
    assert not (workdir / "results/tiles").exists() and not (workdir / "results/embeddings").exists()

    # the same cohort without the bad slides passes
    write_sheet(sheet, rows[:1])
    write_clinical(clinical, [["P1", "1", "1"]])
    ok = snakemake(workdir, "check", *config)
    assert "0 error(s)" in ok.stderr + ok.stdout
    assert len(pd.read_csv(workdir / "results/preflight.tsv", sep="\t")) == 1  # tiny is random init: a warning


@pytest.mark.slow
@pytest.mark.integration
def test_undecodable_tiles_fail_the_embedding_job_and_keep_other_slides(tmp_path):
    """Damage the preflight cannot see (a tile row away from the centre): the embedding job fails naming the
    slide, the tile and the fix; slides embedded before it are not lost; with on_slide_error: record the rerun
    reuses them and records the bad slide."""
    workdir = copy_workflow(tmp_path / "wf")
    slides = tmp_path / "slides"
    slides.mkdir()
    rows = [
        ["good1", "P1", good_slide(slides / "good1.tiff", seed=1)],
        ["good2", "P2", good_slide(slides / "good2.tiff", seed=2)],
        # level 0 is read only by the embedding (tissue: level 2, QC thumbnail: level 1 at 4096 px)
        ["damaged", "P3", corrupt_tiles_slide(slides / "damaged.tiff", side=4096, rows=(5,))],
        ["good3", "P4", good_slide(slides / "good3.tiff", seed=3)],
    ]
    sheet = write_sheet(tmp_path / "cohort.tsv", rows)
    (workdir / "tiny.yaml").write_text(TINY)
    config = ["--configfile", "tiny.yaml", "--config", f"slides={sheet}", "clinical="]
    target = "results/zeroshot/tiny/nsclc/calls.tsv"
    assert snakemake(workdir, "check", *config).returncode == 0  # the damage is away from the tile it reads

    failed = snakemake(workdir, target, "--keep-going", *config, check=False)
    assert failed.returncode != 0
    log = (workdir / "results/logs/embed/tiny/shard00000.log").read_text()
    assert "slide 'damaged'" in log and "cannot be decoded" in log and "re-export or re-scan" in log
    for slide in ("good1", "good2", "damaged", "good3"):  # tiling worked for all: the damage is at level 0
        assert (workdir / f"results/tiles/{slide}.parquet").exists()
    kept = workdir / "results/embeddings/tiny/.finished"
    assert sorted(p.name for p in kept.iterdir()) == ["good1.parquet", "good2.parquet"]
    assert not list((workdir / "results/embeddings/tiny").glob("*.tmp")) + list(
        (workdir / "results/embeddings/tiny").glob(".*.tmp")
    )

    recorded = snakemake(workdir, target, *config, "on_slide_error=record")
    assert recorded.returncode == 0
    log = (workdir / "results/logs/embed/tiny/shard00000.log").read_text()
    assert "reusing 2 finished slide(s): good1, good2" in log
    assert read_metadata(workdir / "results/embeddings/tiny/damaged.parquet")["status"] == "error"
    calls = pd.read_csv(workdir / target, sep="\t", keep_default_na=False).set_index("slide_id")
    assert calls.loc["damaged", "status"] == "error" and calls.loc["good3", "status"] == "ok"
