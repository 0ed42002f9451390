"""The cohort sheet, and the table reader it shares with the clinical table (histoclip.survival.clinical).

Both are read as text first and checked cell by cell, so that an error can name the file, the line and the
column, and say how to fix it. The checks here are the cheap ones (syntax, uniqueness, that files exist);
opening slides belongs in a rule, because every cluster job re-reads the sheet.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from histoclip.errors import InputError, InputErrors

#: Slide ids become file names and Snakemake wildcards: nothing that could escape a folder or a shell.
SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
SHEET_COLUMNS = ("slide_id", "patient_id", "path")


@dataclass(frozen=True)
class SlideRecord:
    """One row of the cohort sheet, with ``path`` resolved to an absolute path."""

    slide_id: str
    patient_id: str
    path: Path
    mpp: float | None = None
    label: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    #: Where this slide's ``mpp`` cell is (file, line, column) when the sheet has an ``mpp`` column, else "": a
    #: slide without mpp metadata is then told to fill in that cell, not to add a column the sheet already has.
    mpp_cell: str = ""
    #: The slide's regions of interest (the sheet's optional ``roi`` column: a GeoJSON file as QuPath exports
    #: annotations), absolute; tiling keeps only tissue inside them (histoclip.tiling.roi).
    roi: Path | None = None


def _line(index: int) -> int:
    """1-based line number in the file of data row ``index`` (the header is line 1)."""
    return index + 2


def read_table(path: str | Path, *, kind: str, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a TSV (or, by extension, CSV) as strings, with clear errors for the usual mistakes."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            "file not found", where=f"{kind} {path}", fix=f"create it or point the config key at the right {kind}"
        )
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError as exc:
        raise InputError("is empty", where=f"{kind} {path}", fix=f"add a header line: {', '.join(required)}") from exc
    except pd.errors.ParserError as exc:
        raise InputError(f"cannot be parsed ({exc})", where=f"{kind} {path}", fix="check the delimiters") from exc
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        hint = f"add the column(s) {', '.join(missing)}"
        other = "," if sep == "\t" else "\t"
        if len(table.columns) == 1 and other in table.columns[0]:
            hint = (
                f"the file looks {'comma' if other == ',' else 'tab'}-separated; save it as "
                f"{'TSV (tab-separated)' if sep == chr(9) else 'CSV'} or change its extension"
            )
        raise InputError(
            f"missing required column(s) {missing}; found {list(table.columns)}", where=f"{kind} {path}", fix=hint
        )
    if table.empty:
        raise InputError("has a header but no rows", where=f"{kind} {path}", fix="add at least one row")
    return table.apply(lambda col: col.str.strip())


def _parse_positive_float(value: str, *, where: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise InputError(
            f"{what} {value!r} is not a positive number", where=where, fix=f"write {what} in µm/px, e.g. 0.25"
        )
    return number


def check_cohort_sheet(path: str | Path, *, check_files: bool = True) -> tuple[list[SlideRecord], list[InputError]]:
    """The sheet's valid rows and a list of problems with the others, one :class:`InputError` per problem.

    Problems with the table as a whole (missing file, columns, no rows) raise at once. The preflight
    (histoclip.preflight) goes on checking the valid rows' slides; :func:`read_cohort_sheet` refuses the sheet.
    ``check_files=False`` skips the one check that touches the file system per row (the slide file exists):
    for readers that run once per cluster job, after the run that planned them checked it.
    """
    path = Path(path)
    table = read_table(path, kind="cohort sheet", required=SHEET_COLUMNS)
    base = path.resolve().parent
    seen: dict[str, int] = {}
    folded: dict[str, tuple[str, int]] = {}
    records = []
    problems: list[InputError] = []
    for line, row, where in _rows(path, table):
        slide_id = row["slide_id"]
        problem = _slide_id_problem(slide_id, where, seen, folded)
        if problem is not None:
            problems.append(problem)
            continue
        seen[slide_id] = line
        folded[slide_id.lower()] = (slide_id, line)
        try:
            records.append(_slide_record(row, list(table.columns), base, where, check_files))
        except InputError as exc:
            problems.append(exc)
    return records, problems


def _rows(path: Path, table: pd.DataFrame) -> Iterator[tuple[int, dict[str, Any], Callable[[str], str]]]:
    """Each data row of a sheet with its line in the file and ``where(column)``, the place a problem names."""
    for index, row in zip(table.index, table.to_dict("records"), strict=True):  # iterrows: 10x slower
        line = _line(int(index))

        def where(column: str, line: int = line) -> str:
            return f"{path}, line {line}, column {column!r}"

        yield line, row, where


def _slide_id_problem(
    slide_id: str, where: Callable[[str], str], seen: dict[str, int], folded: dict[str, tuple[str, int]]
) -> InputError | None:
    """What is wrong with a slide id (empty, unsafe, taken, taken but for letter case), given the ids ``seen``
    before (with their lines) and ``folded`` (the same, by lower-case id); None for a usable id."""
    if not slide_id:
        return InputError("empty slide id.", where=where("slide_id"), fix="give every slide an id.")
    if not SAFE_ID.match(slide_id):
        return InputError(
            f"slide id {slide_id!r} has characters outside [A-Za-z0-9._-].",
            where=where("slide_id"),
            fix="use only letters, digits, '.', '_' and '-' (ids become file names).",
        )
    if slide_id in (".", ".."):
        return InputError(f"slide id {slide_id!r} is not a usable name.", where=where("slide_id"), fix="rename it.")
    if slide_id in seen:
        return InputError(
            f"duplicate slide id {slide_id!r} (first on line {seen[slide_id]}).",
            where=where("slide_id"),
            fix="make slide ids unique.",
        )
    if slide_id.lower() in folded:
        other, other_line = folded[slide_id.lower()]
        return InputError(
            f"slide id {slide_id!r} differs from {other!r} (line {other_line}) only in letter case, so both "
            "would write the same files on a case-insensitive file system (macOS, Windows shares).",
            where=where("slide_id"),
            fix="make slide ids unique regardless of case.",
        )
    return None


def _slide_record(
    row: dict[str, Any], columns: list[str], base: Path, where: Callable[[str], str], check_files: bool
) -> SlideRecord:
    """The record of a row whose slide id is usable; an :class:`InputError` for its first other problem (empty
    patient id or path, missing slide file, invalid mpp). Relative paths are relative to ``base``."""
    slide_id = row["slide_id"]
    if not row["patient_id"]:
        raise InputError(f"empty patient id for slide {slide_id!r}.", where=where("patient_id"), fix="fill it in.")
    if not row["path"]:
        raise InputError(f"empty path for slide {slide_id!r}.", where=where("path"), fix="give the slide file.")
    slide_path = Path(os.path.expanduser(row["path"]))
    if not slide_path.is_absolute():
        slide_path = base / slide_path
    if check_files and not slide_path.exists():
        raise InputError(
            f"slide file {str(slide_path)!r} for {slide_id!r} does not exist.",
            where=where("path"),
            fix="correct the path (relative paths are relative to the sheet's folder).",
        )
    mpp = None
    if "mpp" in columns and row["mpp"]:
        mpp = _parse_positive_float(row["mpp"], where=where("mpp"), what="mpp")
    label = row["label"] if "label" in columns and row["label"] else None
    extra = {c: row[c] for c in columns if c not in (*SHEET_COLUMNS, "mpp", "label", "roi")}
    mpp_cell = where("mpp") if "mpp" in columns else ""
    roi = None
    if "roi" in columns and row["roi"]:
        roi = Path(os.path.expanduser(row["roi"]))
        roi = roi if roi.is_absolute() else base / roi
        if check_files and not roi.is_file():
            raise InputError(
                f"ROI file {str(roi)!r} for {slide_id!r} does not exist.",
                where=where("roi"),
                fix="correct the path (relative paths are relative to the sheet's folder), or empty the cell to tile "
                "all of the slide's tissue.",
            )
    return SlideRecord(slide_id, row["patient_id"], slide_path, mpp, label, extra, mpp_cell, roi)


def read_cohort_sheet(path: str | Path, *, check_files: bool = True) -> list[SlideRecord]:
    """Read and validate the cohort sheet; relative paths are resolved against the sheet's folder.

    Every problem is reported at once (an :class:`InputErrors` listing each with its line and column).
    """
    records, problems = check_cohort_sheet(path, check_files=check_files)
    if problems:
        raise InputErrors(f"{len(problems)} problem(s) in the cohort sheet", problems)
    return records


def sheet_frame(path: str | Path) -> pd.DataFrame:
    """The validated cohort sheet as a frame (slide files not checked): slide_id, patient_id, label ("" where
    none) and every other column of the sheet, as text. For analyses that read a column the sheet's owner named
    in the config (a MIL task's labels, the audit's sites)."""
    records = read_cohort_sheet(path, check_files=False)
    rows = [
        {"slide_id": r.slide_id, "patient_id": r.patient_id, "label": r.label or ""} | dict(r.extra) for r in records
    ]
    return pd.DataFrame(rows).fillna("")
