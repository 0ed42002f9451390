"""The clinical table as it comes: which columns hold the patient and each endpoint, one or several rows a patient.

Why the survival config names the columns: clinical tables are rarely written for this workflow. A TCGA/SurvPath
table has ``case_id``, ``survival_months`` and ``censorship`` (1 = censored), one row per *slide*; ours has
``patient_id``, ``time`` and ``event`` (1 = event). ``survival.patient_column`` and each endpoint's ``time``,
``event`` and ``coding`` (:mod:`histoclip.survival.endpoints`) say which is which, so such a table works without
conversion, and the coding check keeps a censorship column from being read as events.

What is checked, every problem at once with its line and column: the columns exist (naming the config key that
asks for each), patient ids are filled in, times are numbers >= 0 and events 0 or 1 (empty or ``NA`` cells are
missing values: the patient is left out of that endpoint, with a warning, when the analysis runs). A patient with
several rows (one per slide) must have the same time and event on each; other columns that differ between a
patient's rows are slide-level (``slide_id``) and dropped, and logged. With the cohort sheet's patients: the table
must share ids with the sheet and record an event for every endpoint among them, otherwise no survival model can
be fitted — usually a mismatch of id formats or an inverted coding, better said before the run than after it.

The workflow reads the table when it plans a run (rules/common.smk) and the preflight checks it, so this module
stays cheap to import: pandas, no lifelines.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip.errors import InputError, InputErrors
from histoclip.sheets import read_table
from histoclip.survival.cells import is_missing
from histoclip.survival.endpoints import Endpoint

log = logging.getLogger(__name__)

__all__ = ["ClinicalLayout", "ClinicalTable", "read_clinical_table"]


@dataclass(frozen=True)
class ClinicalLayout:
    """Which columns of the clinical table hold the patient id and each endpoint's time and event (config
    ``survival.patient_column`` and ``survival.endpoints``)."""

    patient_column: str = "patient_id"
    endpoints: tuple[Endpoint, ...] = (Endpoint("os"),)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClinicalLayout:
        """From the validated config (its ``survival`` section); endpoint codings are checked here."""
        section = config["survival"]
        entries = section.get("endpoints") or {}
        endpoints = tuple(Endpoint.from_config(name, entry) for name, entry in entries.items())
        return cls(str(section.get("patient_column") or "patient_id"), endpoints or cls.endpoints)

    def required(self) -> dict[str, str]:
        """Every column the table must have → the config key that names it (first key wins), in table order."""
        columns = {self.patient_column: "survival.patient_column"}
        for endpoint in self.endpoints:
            key = f"survival.endpoints.{endpoint.name}"
            columns.setdefault(endpoint.time, f"{key}.time")
            columns.setdefault(endpoint.event, f"{key}.event")
        return columns


@dataclass(frozen=True)
class ClinicalTable:
    """One row per patient (index ``patient_id``; the file's columns, fully numeric ones as numbers)."""

    table: pd.DataFrame
    #: Patients in the cohort sheet without a clinical row (a warning, not an error).
    missing_patients: list[str]
    #: Columns that differ between rows of one patient (slide-level, e.g. slide_id), dropped.
    slide_level_columns: list[str] = field(default_factory=list)


def read_clinical_table(
    path: str | Path, patients: Sequence[str] | None = None, *, layout: ClinicalLayout | None = None
) -> ClinicalTable:
    """Read and check the clinical table (TSV, or CSV by its ``.csv`` extension) as ``layout`` names its columns
    (default: ``patient_id``, ``time``, ``event`` with 1 = event) and reduce it to one row per patient.

    With ``patients`` (the cohort sheet's), the table must share patient ids with the sheet and record at least one
    event of every endpoint among them. Raises :class:`InputErrors` listing every problem with its line and column.
    """
    path = Path(path)
    layout = layout or ClinicalLayout()
    for endpoint in layout.endpoints:
        endpoint.check_coding()
    raw = read_table(path, kind="clinical table", required=())
    _check_columns(raw, layout, path)
    problems = _cell_problems(raw, layout, path)
    if problems:
        raise InputErrors(f"{len(problems)} problem(s) in the clinical table", problems)
    values = _endpoint_values(raw, layout)
    table, slide_level, conflicts = _one_row_per_patient(raw, values, layout, path)
    if conflicts:
        raise InputErrors(f"{len(conflicts)} problem(s) in the clinical table", conflicts)
    if patients is not None:
        problems = _cohort_problems(table, values, layout, list(patients), path)
        if problems:
            raise InputErrors(f"{len(problems)} problem(s) in the clinical table", problems)
    missing = sorted(set(patients or []) - set(table.index))
    return ClinicalTable(table, missing, slide_level)


def _check_columns(table: pd.DataFrame, layout: ClinicalLayout, path: Path) -> None:
    """The columns the layout names are there, or one error naming each missing column's config key."""
    required = layout.required()
    missing = [column for column in required if column not in table.columns]
    if not missing:
        return
    asked = ", ".join(f"{column!r} ({required[column]})" for column in missing)
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    other = "\t" if sep == "," else ","
    censorship = [c for c in table.columns if "censor" in c.lower()]
    if len(table.columns) == 1 and other in table.columns[0]:
        fix = (
            f"the file looks {'comma' if other == ',' else 'tab'}-separated; save it as "
            f"{'TSV (tab-separated)' if sep == chr(9) else 'CSV'} or change its extension"
        )
    elif censorship and not any(e.event in table.columns for e in layout.endpoints):
        time = next((c for c in table.columns if "surviv" in c.lower() or "time" in c.lower()), "TIME")
        patient = next((c for c in table.columns if c.lower() in ("case_id", "patient", "patient_id")), "PATIENT")
        fix = (
            f"this looks like a CLAM/SurvPath table ({censorship[0]!r}: 1 = censored): read it as it is with "
            f"survival: {{patient_column: {patient}, endpoints: {{os: {{time: {time}, event: {censorship[0]}, "
            "coding: censorship}}} (event = 1 - censorship), or convert it once with "
            "`python -m histoclip.survival from-censorship`"
        )
    else:
        fix = "add the column(s), or point those config keys at the table's own column names"
    raise InputError(
        f"missing required column(s) {missing} — {asked}; found {list(table.columns)}",
        where=f"clinical table {path}",
        fix=fix,
    )


def _where(path: Path, index: int, column: str) -> str:
    return f"{path}, line {index + 2}, column {column!r}"


def _cell_problems(table: pd.DataFrame, layout: ClinicalLayout, path: Path) -> list[InputError]:
    """Empty patient ids, times that are not numbers >= 0, events that are not 0/1 (missing cells are allowed),
    one error per cell, in line order."""
    problems: list[tuple[int, int, InputError]] = []
    patient = layout.patient_column
    pids = table[patient]
    for index in table.index[pids.eq("")]:
        error = InputError("empty patient id.", where=_where(path, index, patient), fix="fill it in.")
        problems.append((index, 0, error))
    checked: set[str] = set()
    for endpoint in layout.endpoints:
        for column, is_time in ((endpoint.time, True), (endpoint.event, False)):
            if column in checked:
                continue
            checked.add(column)
            cells = table[column]
            given = ~is_missing(cells)
            numbers = pd.to_numeric(cells.where(given), errors="coerce")
            usable = np.isfinite(numbers) & numbers.ge(0) if is_time else numbers.isin([0, 1])
            bad = given & ~usable
            position = 1 + list(table.columns).index(column)
            for index in table.index[bad]:
                error = _cell_error(endpoint, is_time, cells[index], pids[index], _where(path, index, column))
                problems.append((index, position, error))
    return [error for _, _, error in sorted(problems, key=lambda p: (p[0], p[1]))]


def _cell_error(endpoint: Endpoint, is_time: bool, value: str, pid: str, where: str) -> InputError:
    if is_time:
        return InputError(
            f"{value!r} for patient {pid!r} is not a time ≥ 0.",
            where=where,
            fix="give the follow-up time as a non-negative number (an empty cell or NA: no follow-up known).",
        )
    meaning = (
        "1 = event observed, 0 = censored (note: a 'censorship' column is the opposite: set its endpoint's "
        "coding: censorship)"
        if endpoint.coding == "event"
        else "1 = censored, 0 = event observed (coding: censorship)"
    )
    return InputError(f"{value!r} for patient {pid!r} is not 0 or 1.", where=where, fix=f"use {meaning}.")


def _endpoint_values(table: pd.DataFrame, layout: ClinicalLayout) -> pd.DataFrame:
    """Every endpoint column as numbers (missing cells NaN), indexed like the file's rows."""
    columns = {c for e in layout.endpoints for c in (e.time, e.event)}
    return pd.DataFrame(
        {c: pd.to_numeric(table[c].where(~is_missing(table[c])), errors="coerce") for c in sorted(columns)},
        index=table.index,
    )


def _one_row_per_patient(
    raw: pd.DataFrame, values: pd.DataFrame, layout: ClinicalLayout, path: Path
) -> tuple[pd.DataFrame, list[str], list[InputError]]:
    """The first row of every patient, when the patient's rows agree on every endpoint value (an error per patient
    otherwise); columns that differ between a patient's rows are dropped as slide-level. One groupby: linear."""
    patient = layout.patient_column
    pids = raw[patient]
    grouped = values.groupby(pids.to_numpy(), sort=False)
    varying = grouped.nunique(dropna=False).gt(1)
    conflicts = []
    for pid in varying.index[varying.any(axis=1)]:
        rows = raw.index[pids.eq(pid)]
        lines = ", ".join(str(i + 2) for i in rows)
        differing = [
            f"{column} {' vs '.join(raw.loc[rows, column].unique())}" for column in varying.columns[varying.loc[pid]]
        ]
        conflicts.append(
            InputError(
                f"patient {pid!r} has rows with different survival values ({'; '.join(differing)}).",
                where=f"clinical table {path}, lines {lines}",
                fix="a patient has one follow-up: correct the rows so that they agree (several rows are fine, "
                "e.g. one per slide, when their times and events are the same).",
            )
        )
    others = [c for c in raw.columns if c not in values.columns and c != patient]
    counts = raw[others].groupby(pids.to_numpy(), sort=False).nunique() if others else pd.DataFrame()
    slide_level = [c for c in others if counts[c].gt(1).any()]
    first = ~pids.duplicated()
    several = int(pids.duplicated().sum())
    if several:
        log.info(
            "clinical table %s: %d patient(s) have several rows (e.g. one per slide), read as one row each%s",
            path,
            int(pids[pids.duplicated()].nunique()),
            f"; columns that differ between a patient's rows are slide-level and dropped: {', '.join(slide_level)}"
            if slide_level
            else "",
        )
    table = raw.loc[first, [c for c in raw.columns if c not in slide_level]].copy()
    for column in table.columns:
        if column in values.columns:
            table[column] = values.loc[first, column]
            if any(column == e.event for e in layout.endpoints):
                table[column] = table[column].astype("Int64")
        elif column != patient:
            converted = pd.to_numeric(table[column], errors="coerce")
            if converted.notna().all():
                table[column] = converted
    table.index = pd.Index(table[patient], name="patient_id")
    return table, slide_level, conflicts


def _cohort_problems(
    table: pd.DataFrame, values: pd.DataFrame, layout: ClinicalLayout, patients: list[str], path: Path
) -> list[InputError]:
    """Why no survival model could be fitted on the cohort's patients: none of them in the table, or an endpoint
    without an event among them."""
    cohort = set(patients)
    shared = cohort & set(table.index)
    if cohort and not shared:
        return [
            InputError(
                f"none of the {len(cohort)} patients of the cohort sheet has a row here (sheet ids such as "
                f"{sorted(cohort)[:3]}; table ids such as {sorted(table.index)[:3]}).",
                where=f"clinical table {path}, column {layout.patient_column!r}",
                fix="use the same patient ids in the sheet and the table (e.g. TCGA case ids 'TCGA-XX-XXXX', "
                "not slide barcodes; survival.patient_column names the table's column), or set clinical: null to "
                "run without survival analyses.",
            )
        ]
    problems = []
    members = table.loc[table.index.isin(shared)]
    for endpoint in layout.endpoints:
        events = pd.to_numeric(members[endpoint.event], errors="coerce")
        if shared and not events.eq(endpoint.event_value).any():
            censored = "1" if endpoint.coding == "censorship" else "0"
            problems.append(
                InputError(
                    f"no events: all {len(shared)} patients of the cohort are censored for {endpoint.describe()} "
                    f"({endpoint.event} = {censored} or empty), so no survival model can be fitted.",
                    where=f"clinical table {path}, column {endpoint.event!r}",
                    fix=f"check the event coding (survival.endpoints.{endpoint.name}.coding: event = 1 means the "
                    "event was observed; a CLAM/SurvPath 'censorship' column is the opposite: coding: censorship), "
                    "or set clinical: null to run without survival analyses.",
                )
            )
    return problems
