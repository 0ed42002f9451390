"""envs/*.yaml can't be built here (no conda), so check what can be: they parse, every rule's env exists,
and every pinned package agrees with the project's pins in pyproject.toml and constraints.txt."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;]+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines):
    out = {}
    for line in lines:
        match = PIN.match(line.strip())
        if match:
            out[canonical(match[1])] = match[2]
    return out


@pytest.fixture(scope="module")
def project_pins(repo):
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    extras = [pin for group in pyproject["project"]["optional-dependencies"].values() for pin in group]
    declared = pins(pyproject["project"]["dependencies"] + extras)
    locked = pins((repo / "constraints.txt").read_text().splitlines())
    return declared, locked


def env_files(repo):
    files = sorted((repo / "envs").glob("*.yaml"))
    assert files, "no conda environment specs in envs/"
    return files


def test_pyproject_pins_agree_with_constraints(project_pins):
    declared, locked = project_pins
    for name, version in declared.items():
        assert locked.get(name) == version, f"{name}: pyproject {version}, constraints.txt {locked.get(name)}"


def test_envs_parse_and_agree_with_pins(repo, project_pins):
    _, locked = project_pins
    for path in env_files(repo):
        env = yaml.safe_load(path.read_text())
        deps = env["dependencies"]
        assert "python=3.11" in deps, f"{path.name}: python must be 3.11"
        pip_deps = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
        env_pins = pins(pip_deps)
        assert len(env_pins) == len(pip_deps), f"{path.name}: every pip requirement must be pinned with =="
        for name, version in env_pins.items():
            assert locked.get(name) == version, f"{path.name}: {name}=={version}, project pins {locked.get(name)}"


def test_every_rule_env_exists(repo):
    for smk in (repo / "rules").glob("*.smk"):
        for env in re.findall(r'conda:\s*\n\s*"([^"]+)"', smk.read_text()):
            assert (smk.parent / env).resolve().is_file(), f"{smk.name} refers to missing {env}"
