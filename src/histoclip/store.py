"""Atomic, self-describing outputs.

A cohort run is killed sooner or later (walltime, pre-emption, OOM). Writing to a temporary file in the
target folder and renaming it over the final path means a reader never sees half a file, and Snakemake's
"output exists" never lies. Provenance (package versions, parameters) travels inside each file so that a
table found on disk months later still says how it was made.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import pandas as pd

#: Packages whose versions are recorded in every output's provenance.
PROVENANCE_PACKAGES = (
    "openslide-python",
    "openslide-bin",
    "numpy",
    "pyarrow",
    "pillow",
    "torch",
    "open_clip_torch",
    "snakemake",
)

_UMASK = os.umask(0)
os.umask(_UMASK)

#: Key under which provenance JSON is stored in Parquet key-value metadata.
PROVENANCE_KEY = "histoclip.provenance"


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape outputs; 'absent' when one is not installed."""
    import histoclip

    versions = {"python": platform.python_version(), "histoclip": histoclip.__version__}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    with contextlib.suppress(Exception):
        import openslide

        versions["libopenslide"] = openslide.__library_version__
    return versions


def remove_stale_temporaries(final: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files left beside ``final`` by a writer that was killed (SIGKILL, walltime, OOM).

    Only one job ever writes a given output (Snakemake sees to that), so when a new write of ``final`` starts,
    any earlier temporary of the same file belongs to a dead process: without this, every crash would leave
    up to a slide's worth of embeddings behind as a hidden file.
    """
    final = Path(final)
    removed = []
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    Temporaries that an earlier, killed write of ``path`` left behind are removed first.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are shared like any other file
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def link_atomic(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Hard-link ``src`` at ``dst`` (atomically replacing it); copy where links are not possible."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_tsv(frame: pd.DataFrame, path: str | os.PathLike[str], *, float_format: str = "%.6g") -> None:
    """TSV the way every table of the workflow is written: atomic, tab-separated, '\\n' line ends, no index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, lineterminator="\n", float_format=float_format)


def concat_tsv_atomic(parts: Sequence[str | os.PathLike[str]], path: str | os.PathLike[str]) -> None:
    """Write the TSV files ``parts`` (one header each, the same) as one table at ``path``.

    Why as text: a cohort-wide table is assembled from per-shard tables (one per job), so that the rule making
    it takes a few hundred inputs instead of one per slide; concatenating the text keeps it byte-identical to
    the table written in one go, whatever the column types of a shard (quoted multi-line fields included).
    """
    if not parts:
        raise ValueError(f"no table to concatenate into {path}")
    header, bodies = None, []
    for part in parts:
        first, _, body = Path(part).read_text(encoding="utf-8").partition("\n")
        if header is None:
            header = first
        elif first != header:
            raise ValueError(f"{part}: columns {first!r} differ from those of {parts[0]} ({header!r})")
        bodies.append(body if not body or body.endswith("\n") else body + "\n")
    write_text_atomic(path, header + "\n" + "".join(bodies))


def json_value(value: Any) -> str:
    """How every metadata value is stored: JSON, so types (and ids like "001") round-trip."""
    return json.dumps(value)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_table_atomic(path: str | os.PathLike[str], table: pa.Table, metadata: Mapping[str, Any]) -> None:
    """Write ``table`` as Parquet with ``metadata`` (every value JSON-encoded, so types round-trip).

    Provenance (package versions) is added under :data:`PROVENANCE_KEY`.
    """
    kv = {str(k): json_value(v) for k, v in metadata.items()}
    kv[PROVENANCE_KEY] = json_value({"versions": package_versions()})
    existing = table.schema.metadata or {}
    table = table.replace_schema_metadata({**existing, **{k.encode(): v.encode() for k, v in kv.items()}})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Key-value metadata of a Parquet file written by :func:`write_table_atomic`, JSON-decoded.

    Reads only the footer, so it is cheap even for large files.
    """
    raw = pq.read_schema(path).metadata or {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode()
        if key == "ARROW:schema":
            continue
        try:
            out[key] = json.loads(v)
        except json.JSONDecodeError:  # written by another tool: keep the raw string
            out[key] = v.decode()
    return out
