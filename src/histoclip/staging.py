"""Slides staged to local scratch for the life of a shard (config ``tiling.stage_dir``, ``embedding.stage_dir``).

Why: on a cluster, slides usually live on network storage (NFS, Lustre, GPFS) shared by every node, and a shard
reads each slide's tiles in many small random reads from several processes; on a busy file system that, not the
decoding, sets the pace. A shard with ``stage_dir`` (e.g. ``$TMPDIR`` on a SLURM node: environment variables are
expanded on the node, when the job runs) first copies its slides there in one sequential pass each, reads the
copies, and removes them when it ends, also when it fails. Nothing about a slide's outputs changes: tile files
record the slide's own path, resumption keys use it, errors name it.

What is copied, per slide file:

- a single-file slide (SVS, TIFF, NDPI, SCN, BIF, CZI, ...): the file;
- MIRAX (``.mrxs``): staged whole, the index file and its data folder of the same name beside it;
- DICOM (``.dcm``): staged whole, the file's folder (OpenSlide and wsidicom read every instance of the series
  from the folder the sheet's file is in);
- other multi-file formats (Hamamatsu ``.vms``/``.vmu``, Olympus ``.vsi``): not staged, read in place (a log line
  says so): their companion files are not named by one rule;
- a path that does not exist or is a folder: not staged (the reader then says what is wrong with it).

Before copying, the free space of the folder is checked against the bytes the shard's slides need; too little
is an error that names the folder, the bytes needed and the bytes free. A job killed outright (SIGKILL, out of
memory) cannot remove its copies; on SLURM, ``$TMPDIR`` is removed with the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from histoclip.errors import InputError

log = logging.getLogger(__name__)

#: Multi-file formats read in place (their companion files follow no single naming rule).
NOT_STAGED = {".vms": "Hamamatsu VMS", ".vmu": "Hamamatsu VMU", ".vsi": "Olympus VSI"}
_UNSET_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


@dataclass(frozen=True)
class StageUnit:
    """What is copied for one slide file: ``source`` (a file or a folder), and where the slide file is inside it."""

    source: Path
    slide_inside: Path  # the slide file's path relative to the copy of ``source``'s parent
    companions: tuple[Path, ...] = ()  # further files or folders copied beside it (MIRAX's data folder)

    def bytes(self) -> int:
        return sum(tree_bytes(path) for path in (self.source, *self.companions))


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def stage_unit(path: str | Path) -> StageUnit | None:
    """What must be copied for the slide at ``path`` (see the module docstring), or None when it is read in place."""
    path = Path(path)
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix in NOT_STAGED:
        return None
    if suffix == ".mrxs":
        data = path.with_suffix("")
        return StageUnit(path, Path(path.name), (data,) if data.is_dir() else ())
    if suffix == ".dcm":
        return StageUnit(path.parent, Path(path.parent.name) / path.name)
    return StageUnit(path, Path(path.name))


def resolve_stage_dir(stage_dir: str, setting: str) -> Path:
    """``stage_dir`` with ``~`` and environment variables expanded; an unset variable is an error naming it."""
    expanded = os.path.expanduser(os.path.expandvars(stage_dir))
    unset = _UNSET_VARIABLE.search(expanded)
    if unset:
        raise InputError(
            f"{stage_dir!r} names the environment variable ${unset.group(1)}, which is not set where this job runs",
            where=f"config {setting}",
            fix=f"set {unset.group(1)} in the job's environment (SLURM sets TMPDIR on most clusters), give an "
            f"absolute folder, or set {setting}: null to read slides where they are",
        )
    return Path(expanded)


def human_bytes(count: int) -> str:
    """Bytes in decimal units, as ``df -H`` prints them."""
    value, unit = float(count), "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):  # noqa: B007 (the last unit tried is the one printed)
        if value < 1000:
            break
        value /= 1000
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"


@contextlib.contextmanager
def staged(paths: Sequence[str], stage_dir: str | None, setting: str) -> Iterator[dict[str, str]]:
    """Copy the slides at ``paths`` into a folder of their own under ``stage_dir`` for the block; yield
    {original path: path to read}. With ``stage_dir`` None, or for slides read in place, the path maps to itself.
    The copies are removed when the block ends, however it ends."""
    where = {path: path for path in paths}
    if stage_dir is None or not paths:
        yield where
        return
    folder = resolve_stage_dir(stage_dir, setting)
    units: dict[str, StageUnit] = {}
    for path in dict.fromkeys(paths):
        unit = stage_unit(path)
        if unit is None:
            if Path(path).suffix.lower() in NOT_STAGED:
                log.info("%s: %s is read in place (a multi-file format)", setting, path)
            continue
        units[path] = unit
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"the staging folder {str(folder)!r} cannot be created: {exc}",
            where=f"config {setting}",
            fix=f"point {setting} at a writable local folder, or set it to null to read slides where they are",
        ) from exc
    sources = {}  # each folder or file copied once, whichever slides share it
    for unit in units.values():
        for source in (unit.source, *unit.companions):
            sources.setdefault(source, tree_bytes(source))
    needed, free = sum(sources.values()), shutil.disk_usage(folder).free
    if needed > free:
        raise InputError(
            f"staging this shard's {len(units)} slide(s) needs {human_bytes(needed)} ({needed:,} bytes) in "
            f"{str(folder)!r}, which has {human_bytes(free)} ({free:,} bytes) free",
            where=f"config {setting}",
            fix=f"free space there, point {setting} at a larger local folder, lower the shard size (fewer slides "
            f"per job), or set {setting}: null to read slides where they are",
        )
    area = Path(tempfile.mkdtemp(prefix="histoclip-stage-", dir=folder))
    try:
        copied: dict[Path, Path] = {}  # source → the folder its copy lies in
        for index, (path, unit) in enumerate(units.items()):
            if unit.source not in copied:
                home = area / f"{index:05d}"
                home.mkdir()
                for source in (unit.source, *unit.companions):
                    _copy(source, home / source.name, setting, folder)
                copied[unit.source] = home
            where[path] = str(copied[unit.source] / unit.slide_inside)
        log.info("%s: %d slide(s), %s, staged in %s", setting, len(units), human_bytes(needed), area)
        yield where
    finally:
        shutil.rmtree(area, ignore_errors=True)


def _copy(source: Path, target: Path, setting: str, folder: Path) -> None:
    try:
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
    except OSError as exc:
        raise InputError(
            f"copying {str(source)!r} into the staging folder {str(folder)!r} failed: {exc}",
            where=f"config {setting}",
            fix=f"check the folder's free space and permissions, or set {setting}: null to read slides where they are",
        ) from exc


def unstaged(error: BaseException, where: Mapping[str, str]) -> BaseException:
    """``error`` with every staged path in its message replaced by the slide's own path (errors name the slide
    file the user knows, not a copy that is gone); errors of other kinds are returned as they are."""
    swaps = [(staged_path, original) for original, staged_path in where.items() if staged_path != original]
    if not swaps or not isinstance(error, InputError):
        return error

    def swap(value: object) -> object:
        if isinstance(value, list):  # InputErrors: the problems it gathers
            return [unstaged(item, where) if isinstance(item, BaseException) else swap(item) for item in value]
        if not isinstance(value, str):
            return value
        for staged_path, original in swaps:
            value = value.replace(staged_path, original)
        return value

    if not any(staged_path in str(error) for staged_path, _ in swaps):
        return error
    fresh = type(error).__new__(type(error))
    fresh.__dict__.update({key: swap(value) for key, value in error.__dict__.items()})
    fresh.args = tuple(swap(arg) for arg in error.args)
    fresh.__cause__ = error.__cause__
    return fresh
