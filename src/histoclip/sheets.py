"""The cohort sheet and the clinical table.

Both are read as text first and checked cell by cell, so that an error can name the file, the line and the
column, and say how to fix it. The checks here are the cheap ones (syntax, uniqueness, that files exist);
opening slides belongs in a rule, because every cluster job re-reads the sheet.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from histoclip.errors import InputError

#: Slide ids become file names and Snakemake wildcards: nothing that could escape a folder or a shell.
SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
SHEET_COLUMNS = ("slide_id", "patient_id", "path")
CLINICAL_COLUMNS = ("patient_id", "time", "event")


@dataclass(frozen=True)
class SlideRecord:
    """One row of the cohort sheet, with ``path`` resolved to an absolute path."""

    slide_id: str
    patient_id: str
    path: Path
    mpp: float | None = None
    label: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


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
        if "event" in missing and any(c.startswith("censorship") for c in table.columns):
            hint += "; a 'censorship' column (1 = censored, CLAM/SurvPath style) converts as event = 1 - censorship"
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


def read_cohort_sheet(path: str | Path) -> list[SlideRecord]:
    """Read and validate the cohort sheet; relative paths are resolved against the sheet's folder."""
    path = Path(path)
    table = read_table(path, kind="cohort sheet", required=SHEET_COLUMNS)
    base = path.resolve().parent
    seen: dict[str, int] = {}
    records = []
    problems: list[str] = []
    for index, row in table.iterrows():
        line = _line(int(index))

        def where(column: str, line: int = line) -> str:
            return f"{path}, line {line}, column {column!r}"

        slide_id = row["slide_id"]
        if not slide_id:
            problems.append(f"{where('slide_id')}: empty slide id. Fix: give every slide an id.")
            continue
        if not SAFE_ID.match(slide_id):
            problems.append(
                f"{where('slide_id')}: slide id {slide_id!r} has characters outside [A-Za-z0-9._-]. "
                "Fix: use only letters, digits, '.', '_' and '-' (ids become file names)."
            )
            continue
        if slide_id in (".", ".."):
            problems.append(f"{where('slide_id')}: slide id {slide_id!r} is not a usable name. Fix: rename it.")
            continue
        if slide_id in seen:
            problems.append(
                f"{where('slide_id')}: duplicate slide id {slide_id!r} (first on line {seen[slide_id]}). "
                "Fix: make slide ids unique."
            )
            continue
        seen[slide_id] = line
        if not row["patient_id"]:
            problems.append(f"{where('patient_id')}: empty patient id for slide {slide_id!r}. Fix: fill it in.")
            continue
        if not row["path"]:
            problems.append(f"{where('path')}: empty path for slide {slide_id!r}. Fix: give the slide file.")
            continue
        slide_path = Path(os.path.expanduser(row["path"]))
        if not slide_path.is_absolute():
            slide_path = base / slide_path
        if not slide_path.exists():
            problems.append(
                f"{where('path')}: slide file {str(slide_path)!r} for {slide_id!r} does not exist. "
                "Fix: correct the path (relative paths are relative to the sheet's folder)."
            )
            continue
        mpp = None
        if "mpp" in table.columns and row["mpp"]:
            try:
                mpp = _parse_positive_float(row["mpp"], where=where("mpp"), what="mpp")
            except InputError as exc:
                problems.append(str(exc))
                continue
        label = row["label"] if "label" in table.columns and row["label"] else None
        extra = {c: row[c] for c in table.columns if c not in (*SHEET_COLUMNS, "mpp", "label")}
        records.append(SlideRecord(slide_id, row["patient_id"], slide_path, mpp, label, extra))
    if problems:
        raise InputError(f"{len(problems)} problem(s) in the cohort sheet:\n  - " + "\n  - ".join(problems))
    return records


@dataclass(frozen=True)
class ClinicalTable:
    table: pd.DataFrame
    #: Patients in the cohort sheet without a clinical row (a warning, not an error).
    missing_patients: list[str]


def read_clinical_table(path: str | Path, patients: list[str] | None = None) -> ClinicalTable:
    """Read and validate the clinical table: ``time`` ≥ 0 numeric, ``event`` in {0, 1}, one row per patient.

    Covariate columns are converted to numbers where every value is numeric, and left as text otherwise.
    """
    path = Path(path)
    table = read_table(path, kind="clinical table", required=CLINICAL_COLUMNS)
    problems: list[str] = []
    seen: dict[str, int] = {}
    for index, row in table.iterrows():
        line = _line(int(index))
        pid = row["patient_id"]
        if not pid:
            problems.append(f"{path}, line {line}, column 'patient_id': empty patient id. Fix: fill it in.")
        elif pid in seen:
            problems.append(
                f"{path}, line {line}, column 'patient_id': duplicate patient {pid!r} (first on line {seen[pid]}). "
                "Fix: one row per patient."
            )
        else:
            seen[pid] = line
        try:
            time = float(row["time"])
        except ValueError:
            time = math.nan
        if not math.isfinite(time) or time < 0:
            problems.append(
                f"{path}, line {line}, column 'time': {row['time']!r} for patient {pid!r} is not a time ≥ 0. "
                "Fix: give the follow-up time as a non-negative number."
            )
        if row["event"] not in ("0", "1"):
            problems.append(
                f"{path}, line {line}, column 'event': {row['event']!r} for patient {pid!r} is not 0 or 1. "
                "Fix: use 1 = event observed, 0 = censored (note: a 'censorship' column is the opposite)."
            )
    if problems:
        raise InputError(f"{len(problems)} problem(s) in the clinical table:\n  - " + "\n  - ".join(problems))
    out = table.copy()
    out["time"] = out["time"].astype(float)
    out["event"] = out["event"].astype(int)
    for column in out.columns:
        if column in CLINICAL_COLUMNS:
            continue
        converted = pd.to_numeric(out[column], errors="coerce")
        if converted.notna().all():
            out[column] = converted
    missing = sorted(set(patients or []) - set(out["patient_id"]))
    return ClinicalTable(out, missing)
