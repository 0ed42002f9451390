"""Reproducibility: every stage runs in a pinned environment, a run records the versions it used, and
running the workflow again with nothing changed does nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
from bad_slides import DEMO_CONFIG

from histoclip.versions import installed_versions, write_versions_table

# directives that run code in a job's own environment (a `run:` block runs inside the Snakemake process and
# can't have one)
RUNS_CODE = re.compile(r"^\s+(script|shell|notebook|wrapper):", flags=re.M)
TINY = """\
demo: {n_patients: 8, extra_slides: 0, slide_px: 2048}
embedding: {models: [tiny], shard_size: 4}
"""


def rule_blocks(text: str):
    """(rule name or '<dynamic>', block text) for every `rule` in a .smk file, loops included."""
    starts = [m.start() for m in re.finditer(r"^\s*rule\b[^\n]*:", text, flags=re.M)]
    if not starts:
        return
    for start, end in zip(starts, [*starts[1:], len(text)], strict=True):
        block = text[start:end]
        name = re.match(r"\s*rule\s*(\w*)", block)[1] or "<dynamic>"
        yield name, block


def test_every_rule_that_runs_code_has_a_pinned_conda_env(repo):
    envs = {p.name for p in (repo / "envs").glob("*.yaml")}
    checked = 0
    for smk in sorted((repo / "rules").glob("*.smk")):
        for name, block in rule_blocks(smk.read_text()):
            if not RUNS_CODE.search(block):
                continue
            checked += 1
            env = re.search(r'conda:\s*\n\s*"\.\./envs/([^"]+)"', block)
            assert env, f"{smk.name}: rule {name} runs code but has no `conda:` pointing at envs/*.yaml"
            assert env[1] in envs, f"{smk.name}: rule {name} uses envs/{env[1]}, which does not exist"
    assert checked >= 10


def test_versions_table_is_the_environment_and_matches_the_lock(repo, tmp_path):
    versions = installed_versions()
    import numpy
    import snakemake

    assert versions["snakemake"] == snakemake.__version__
    assert versions["numpy"] == numpy.__version__
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    # the environment make builds follows the lock file: every installed package that is pinned there is at
    # its pinned version (a constraints file may pin more than is installed)
    locked = {}
    for line in (repo / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==")
            locked[re.sub(r"[-_.]+", "-", name).lower()] = version
    installed = {re.sub(r"[-_.]+", "-", name).lower(): v for name, v in versions.items()}
    drift = {name: (pin, installed[name]) for name, pin in locked.items() if installed.get(name, pin) != pin}
    assert not drift, f"environment differs from constraints.txt (pinned, installed): {drift}"

    path = tmp_path / "versions.tsv"
    write_versions_table(path, versions)
    rows = dict(line.split("\t") for line in path.read_text().splitlines()[1:])
    assert rows == versions
    assert rows["pyarrow"] == metadata.version("pyarrow")


@pytest.mark.integration
@pytest.mark.slow
def test_rerun_with_no_change_does_nothing(repo, tmp_path):
    for name in ("Snakefile", "rules", "scripts", "config", "src", "envs"):
        src = repo / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    (tmp_path / "tiny.yaml").write_text(TINY)

    (tmp_path / "top_k.yaml").write_text("zeroshot: {top_k: 7}\n")

    def snakemake(*args: str, configfiles=("tiny.yaml",)) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", *args, "--cores", "2", "--configfile", DEMO_CONFIG, *configfiles],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        out = result.stdout + result.stderr
        assert result.returncode == 0, f"snakemake {' '.join(args)} failed:\n{out}"
        return out

    snakemake("demo_cohort")
    snakemake("all", "results/versions.tsv")
    assert (tmp_path / "results/versions.tsv").is_file()
    assert len(list((tmp_path / "results/embeddings/tiny").glob("*.parquet"))) == 8
    again = snakemake("-n", "all", "results/versions.tsv")
    assert "Nothing to be done" in again, again
    # and a change does rerun what depends on it (so "nothing" above is not a blind spot)
    changed = snakemake("-n", "all", configfiles=("tiny.yaml", "top_k.yaml"))
    assert re.search(r"^zeroshot\s+1$", changed, flags=re.M), changed
    assert not re.search(r"^tile\s+\d+$", changed, flags=re.M), changed
