"""Safety: ids and paths from a sheet cannot escape results/ or reach a shell; YAML is loaded safely; checkpoints
are never unpickled as code. Static checks read the workflow's own source (rules, scripts, library), so a later
change that adds a `shell:` rule with a bare wildcard, a `yaml.load`, or a `torch.load` without
``weights_only=True`` fails here."""

from __future__ import annotations

import ast
import csv
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from bad_slides import copy_workflow, good_slide, snakemake, write_sheet

from histoclip import cli
from histoclip.embedding.models import ModelSpec, load_model
from histoclip.errors import InputError
from histoclip.sheets import SAFE_ID, read_cohort_sheet

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = REPO / "config" / "models" / "tiny-vit.json"
PYTHON_SOURCES = sorted([*(REPO / "src" / "histoclip").rglob("*.py"), *(REPO / "scripts").rglob("*.py")])
RULE_SOURCES = sorted([REPO / "Snakefile", *(REPO / "rules").glob("*.smk")])

UNSAFE_IDS = [
    "../escape",
    "..",
    ".",
    "a/b",
    "/etc/passwd",
    "a\\b",
    "a;rm -rf ~",
    "$(touch pwned)",
    "`touch pwned`",
    "a|b",
    "a&b",
    "a>b",
    "a b",
    "a\tb",
    "~root",
    "a*",
    "a?",
    "{slide}",
    "tümor",
    "a'b",
    'a"b',
]
#: Odd but safe: each must become a file directly inside its output folder.
ODD_SAFE_IDS = ["...", ".hidden", "-rf", "a..b", "x.parquet", "A-1_b.2", "0"]


# --- ids and paths from the sheet ----------------------------------------------------------------------------------


@pytest.mark.parametrize("slide_id", UNSAFE_IDS)
def test_unsafe_slide_ids_are_refused_by_the_sheet_reader(tmp_path, slide_id):
    (tmp_path / "s.svs").write_bytes(b"x")
    sheet = tmp_path / "sheet.tsv"
    with open(sheet, "w", newline="") as fh:  # csv quotes the ids with a tab or a quote in them
        csv.writer(fh, delimiter="\t").writerows([["slide_id", "patient_id", "path"], [slide_id, "P1", "s.svs"]])
    with pytest.raises(InputError) as err:
        read_cohort_sheet(sheet)
    assert "line 2" in str(err.value) and "'slide_id'" in str(err.value)


@pytest.mark.parametrize("slide_id", ODD_SAFE_IDS)
def test_every_accepted_id_names_a_file_inside_its_output_folder(tmp_path, slide_id):
    (tmp_path / "s.svs").write_bytes(b"x")
    sheet = write_sheet(tmp_path / "sheet.tsv", [[slide_id, "P1", "s.svs"]])
    [record] = read_cohort_sheet(sheet)
    results = (tmp_path / "results").resolve()
    for pattern in (
        "tiles/{slide}.parquet",
        "qc/{slide}.png",
        "embeddings/demo/{slide}.parquet",
        "zeroshot/demo/demo/tile_scores/{slide}.parquet",
    ):
        target = (results / pattern.format(slide=record.slide_id)).resolve()
        assert target.parent == (results / pattern).parent.resolve(), target


def test_the_workflow_constrains_the_slide_wildcard_like_the_sheet_reader():
    common = (REPO / "rules" / "common.smk").read_text()
    constraint = re.search(r'^\s*slide=r"([^"]+)"', common, re.M)
    assert constraint, "rules/common.smk must constrain the {slide} wildcard"
    assert f"^{constraint[1]}$" == SAFE_ID.pattern


def unquoted_shell_placeholders(snakefile_text: str) -> list[str]:
    """Placeholders of paths, ids or params inside `shell:` directives that are not quoted with ``:q``."""
    blocks = [m[2] for m in re.finditer(r"^([ \t]*)shell:[ \t]*\n((?:\1[ \t]+.*\n|[ \t]*\n)+)", snakefile_text, re.M)]
    blocks += [m[1] for m in re.finditer(r"^[ \t]*shell:[ \t]*(\S.*)$", snakefile_text, re.M)]
    placeholder = re.compile(r"\{(input|output|wildcards|params|log|resources)(\.[^{}:]*)?(:q)?\}")
    return [m[0] for block in blocks for m in placeholder.finditer(block) if m[3] != ":q"]


def test_no_rule_passes_a_path_or_id_to_a_shell_unquoted():
    for source in RULE_SOURCES:
        assert unquoted_shell_placeholders(source.read_text()) == [], f"{source.name}: quote them with :q"
    # today every rule runs a Python script (no shell at all); the check guards future shell rules, and works:
    rule = 'rule x:\n    shell:\n        "cat {input} {wildcards.slide:q} > {output:q}"\n    log: "l"\n'
    assert unquoted_shell_placeholders(rule) == ["{input}"]
    assert unquoted_shell_placeholders('rule y:\n    shell: "vips {input.slide} {output}"\n') == [
        "{input.slide}",
        "{output}",
    ]


def _calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(node, ast.Call)]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_no_shell_from_python_code():
    for source in PYTHON_SOURCES:
        for call in _calls(source):
            name = _dotted(call.func)
            assert name not in ("os.system", "os.popen", "subprocess.getoutput"), f"{source.name}: {name}"
            for keyword in call.keywords:
                if keyword.arg == "shell":
                    assert isinstance(keyword.value, ast.Constant) and keyword.value.value is False, source.name


# --- YAML and checkpoints ------------------------------------------------------------------------------------------


def test_yaml_is_only_loaded_safely():
    safe_loaders = {"yaml.SafeLoader", "yaml.CSafeLoader"}
    import histoclip.zeroshot.prompts

    for source in PYTHON_SOURCES:
        for call in _calls(source):
            name = _dotted(call.func)
            assert name not in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"), name
            if name == "yaml.load":
                loader = next((k.value for k in call.keywords if k.arg == "Loader"), None)
                assert loader is not None, f"{source.name}: yaml.load without a Loader"
                loader_name = _dotted(loader)
                if loader_name not in safe_loaders:  # a module-level subclass, e.g. prompts._UniqueKeySafeLoader
                    module = {"prompts.py": histoclip.zeroshot.prompts}[source.name]
                    assert issubclass(getattr(module, loader_name), yaml.SafeLoader), loader_name


def test_checkpoints_are_only_loaded_without_unpickling_code():
    for source in [*PYTHON_SOURCES, *sorted((REPO / "benchmarks").rglob("*.py"))]:
        for call in _calls(source):
            name = _dotted(call.func)
            assert name not in ("pickle.load", "pickle.loads", "joblib.load", "dill.load"), f"{source.name}: {name}"
            keywords = {k.arg: k.value for k in call.keywords}
            pretrained = keywords.get("pretrained")
            builds_only = isinstance(pretrained, ast.Constant) and pretrained.value in (False, None)
            if (
                name == "torch.load"
                or (name.endswith("create_model") and not builds_only)
                or name.endswith("load_checkpoint")
            ):  # a model built without weights (pretrained=False/None: timm, the meta-device checks) loads nothing
                flag = keywords.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, (
                    f"{source.name}: {name} without weights_only=True"
                )
            if name in ("np.load", "numpy.load"):
                flag = keywords.get("allow_pickle")
                assert flag is None or (isinstance(flag, ast.Constant) and flag.value is False), source.name


class _Payload:
    """Unpickling this runs a command: what a malicious "checkpoint" does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["bare", "state_dict"])
def test_malicious_pickle_checkpoint_is_refused_without_running_it(tmp_path, layout):
    marker = tmp_path / "PWNED"
    payload = {"visual.proj": _Payload(marker)}
    torch.save(payload if layout == "bare" else {"state_dict": payload}, tmp_path / "evil.pt")
    with pytest.raises(InputError) as err:
        load_model(ModelSpec("evil", str(TINY_VIT), pretrained=str(tmp_path / "evil.pt")), "cpu")
    message = str(err.value)
    assert "'evil'" in message and "arbitrary code" in message and ".safetensors" in message
    assert not marker.exists()


def test_malicious_yaml_config_is_refused_by_the_preflight(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    (tmp_path / "evil.yaml").write_text(f"slides: !!python/object/apply:os.system ['touch {marker}']\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check", "--configfile", "evil.yaml"]) == 2
    assert not marker.exists()


# --- through Snakemake: a slide path full of shell syntax is only ever opened, never run ---------------------------


@pytest.mark.integration
def test_shell_syntax_in_slide_paths_is_inert(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    slides = tmp_path / "slides"
    slides.mkdir()
    names = ["a;touch PWNED1;.tiff", "$(touch PWNED2).tiff", "`touch PWNED3`.tiff", "b' && touch 'PWNED4.tiff"]
    rows = [[f"s{i}", f"P{i}", good_slide(slides / name, seed=i)] for i, name in enumerate(names)]
    sheet = write_sheet(tmp_path / "sheet.tsv", rows)
    snakemake(workdir, "results/qc/cohort.tsv", "--config", f"slides={sheet}", "clinical=")
    import pandas as pd

    cohort = pd.read_csv(workdir / "results/qc/cohort.tsv", sep="\t")
    assert (cohort["status"] == "ok").all() and len(cohort) == len(names)
    assert not [p for p in tmp_path.rglob("PWNED*") if p.parent != slides]
