"""The software a workflow run used, as a table (results/versions.tsv).

Every Parquet output already carries the versions of the packages that shape it (histoclip.store
provenance); this is the whole environment of the Snakemake process, in the format of constraints.txt, so a
run can be compared with the lock file or rebuilt from it. Under `--sdm conda` the jobs run in the envs/*.yaml
environments instead, which are pinned to the same versions (tests/test_envs.py).
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

from histoclip.store import write_text_atomic


def installed_versions() -> dict[str, str]:
    """{distribution name: version} of every installed Python distribution, plus python and the platform."""
    versions = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions[name] = dist.version
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **dict(sorted(versions.items(), key=lambda item: item[0].lower())),
    }


def write_versions_table(path: str | Path, versions: dict[str, str]) -> None:
    """Write ``versions`` as a two-column TSV (package, version), atomically."""
    lines = ["package\tversion"] + [f"{name}\t{version}" for name, version in versions.items()]
    write_text_atomic(path, "\n".join(lines) + "\n")
