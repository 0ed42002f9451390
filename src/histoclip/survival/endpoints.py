"""Survival endpoints: which clinical columns hold a time and an event, read so that an event is never a censoring.

**Endpoints** (config ``survival.endpoints``): a name, a time column and an event column of the clinical table,
and the event column's ``coding``: ``event`` (1 = the event happened, 0 = censored; the default) or
``censorship`` (1 = censored, 0 = the event happened: CLAM/SurvPath tables), read as event = 1 - censorship. A
TCGA/SurvPath table therefore works as it comes (``os: {time: survival_months, event: censorship, coding:
censorship}``); :func:`event_table_from_censorship` (``python -m histoclip.survival from-censorship``) converts one
to our convention instead, once. A column whose name says "censor" coded ``event``, or the ``event`` column coded
``censorship``, is refused: read the wrong way round every hazard ratio flips, and nothing downstream would notice.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from histoclip.errors import InputError
from histoclip.survival.cells import id_list, numeric

log = logging.getLogger(__name__)

__all__ = ["CODINGS", "Endpoint", "endpoint_frame", "event_table_from_censorship"]

_CENSOR_NAME = re.compile(r"censor", re.IGNORECASE)

#: Coding of an event column → the value that means "the event happened".
CODINGS = {"event": 1, "censorship": 0}


@dataclass(frozen=True)
class Endpoint:
    """One survival endpoint: the clinical table's time column and event column, and how the event column is coded
    (``event``: 1 = event; ``censorship``: 1 = censored)."""

    name: str
    time: str = "time"
    event: str = "event"
    coding: str = "event"

    @classmethod
    def from_config(cls, name: str, entry: Mapping[str, Any] | None) -> Endpoint:
        entry = dict(entry or {})
        endpoint = cls(
            name=name,
            time=str(entry.get("time", "time")),
            event=str(entry.get("event", "event")),
            coding=str(entry.get("coding", "event")),
        )
        endpoint.check_coding()
        return endpoint

    @property
    def event_value(self) -> int:
        """The value of the event column that means the event happened."""
        return CODINGS[self.coding]

    def check_coding(self, where: str | None = None) -> None:
        """Refuse the two ways to read censoring as events: it can't be caught later, every HR would flip."""
        where = where or f"survival.endpoints.{self.name}"
        if self.coding not in CODINGS:
            raise InputError(
                f"coding {self.coding!r} is neither 'event' (1 = event) nor 'censorship' (1 = censored)",
                where=where,
                fix="set coding: event or coding: censorship",
            )
        if _CENSOR_NAME.search(self.event) and self.coding == "event":
            raise InputError(
                f"event column {self.event!r} looks like a censoring indicator (1 = censored), but its coding is "
                "'event' (1 = event), which would count every censored patient as an event",
                where=where,
                fix=f"set coding: censorship (an event is where {self.event} == 0), or convert the table to our "
                "convention (event = 1 - censorship) with `python -m histoclip.survival from-censorship`",
            )
        if self.event == "event" and self.coding != "event":
            raise InputError(
                "the clinical table's `event` column is 1 = event, 0 = censored; coding censorship would count "
                "every censored patient as an event",
                where=where,
                fix="remove coding (default event), or point `event` at a censorship column",
            )

    def describe(self) -> str:
        """The endpoint's columns as a message names them."""
        meaning = "1 = event" if self.coding == "event" else "1 = censored"
        return f"endpoint {self.name!r} (time {self.time!r}, event {self.event!r}, {meaning})"


def endpoint_frame(clinical: pd.DataFrame, endpoint: Endpoint, *, where: str = "clinical table") -> pd.DataFrame:
    """``time`` (float) and ``event`` (0/1 in our convention: 1 = event) of one endpoint, indexed like ``clinical``.

    Patients with a missing time or event are left out with a warning; an endpoint with no event at all is an
    error, because a Cox model or a log-rank test on it estimates nothing.
    """
    endpoint.check_coding()
    for key, column in (("time", endpoint.time), ("event", endpoint.event)):
        if column not in clinical.columns:
            raise InputError(
                f"endpoint {endpoint.name!r} needs column {column!r}, which is not there "
                f"(columns: {', '.join(map(str, clinical.columns))})",
                where=where,
                fix=f"add the column or set survival.endpoints.{endpoint.name}.{key} to an existing column",
            )
    time, bad_time = numeric(clinical[endpoint.time])
    raw_event, bad_event = numeric(clinical[endpoint.event])
    problems = []
    for label, bad in ((endpoint.time, bad_time | (time < 0)), (endpoint.event, bad_event)):
        if bad.any():
            problems.append(f"column {label!r} has unusable values for {id_list(clinical.index[bad])}")
    wrong_code = raw_event.notna() & ~raw_event.isin([0, 1])
    if wrong_code.any():
        problems.append(f"column {endpoint.event!r} is not 0/1 for {id_list(clinical.index[wrong_code])}")
    if problems:
        raise InputError(
            f"endpoint {endpoint.name!r}: " + "; ".join(problems),
            where=where,
            fix="times must be numbers >= 0 and events 0 or 1 (empty cells are read as missing)",
        )
    missing = time.isna() | raw_event.isna()
    if missing.any():
        log.warning(
            "endpoint %s: %d patient(s) have no %s/%s value and are left out: %s",
            endpoint.name,
            int(missing.sum()),
            endpoint.time,
            endpoint.event,
            id_list(clinical.index[missing]),
        )
    frame = pd.DataFrame(
        {"time": time[~missing], "event": (raw_event[~missing] == endpoint.event_value).astype(int)},
        index=clinical.index[~missing],
    )
    if frame.empty or frame["event"].sum() == 0:
        raise InputError(
            f"endpoint {endpoint.name!r} has no events among its {len(frame)} patient(s) with a time "
            f"(column {endpoint.event!r}, coded {endpoint.coding}, is never {endpoint.event_value})",
            where=where,
            fix="check the event column and its coding (survival.endpoints."
            f"{endpoint.name}.event / coding), or drop the endpoint",
        )
    return frame


def event_table_from_censorship(
    table: pd.DataFrame,
    *,
    patient_column: str = "case_id",
    time_column: str = "survival_months",
    censorship_column: str = "censorship",
    endpoints: Mapping[str, tuple[str, str]] | None = None,
    where: str = "table",
) -> pd.DataFrame:
    """Convert a CLAM/SurvPath-style table (``censorship`` 1 = censored, often one row per slide) into a clinical
    table in our convention: one row per patient, ``patient_id``, ``time``, ``event`` = 1 - censorship.

    ``endpoints`` adds further endpoints as ``time_{name}`` / ``event_{name}`` from (time column, censorship
    column) pairs, e.g. ``{"dss": ("survival_months_dss", "censorship_dss")}``. Other columns are kept when they
    are the same on every row of a patient (slide-level columns such as ``slide_id`` are dropped, and logged).
    The converted censorship columns are dropped so that nobody can pick them up as an event by mistake.
    """
    pairs = {"": (time_column, censorship_column), **dict(endpoints or {})}
    required = [patient_column, *[c for pair in pairs.values() for c in pair]]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(
            f"missing column(s) {missing}; found {list(table.columns)}",
            where=where,
            fix="name the patient, time and censorship columns (patient_column, time_column, censorship_column)",
        )
    table = table.copy()
    table[patient_column] = table[patient_column].astype(str).str.strip()
    out = pd.DataFrame({"patient_id": table[patient_column]})
    for name, (time_col, censor_col) in pairs.items():
        time, bad_time = numeric(table[time_col])
        censor, bad_censor = numeric(table[censor_col])
        bad = bad_time | (time < 0) | bad_censor | (censor.notna() & ~censor.isin([0, 1]))
        if bad.any():
            raise InputError(
                f"rows {id_list((table.index[bad] + 2).tolist())} have a time that is not a number >= 0 or a "
                f"censorship that is not 0/1 (columns {time_col!r}, {censor_col!r})",
                where=where,
                fix="correct those rows (line numbers count the header as line 1)",
            )
        suffix = f"_{name}" if name else ""
        out[f"time{suffix}"] = time
        out[f"event{suffix}"] = (1 - censor).astype("Int64")
    converted = {patient_column, *[c for pair in pairs.values() for c in pair]}
    for column in table.columns:
        if column not in converted and column not in out.columns:
            out[column] = table[column]
    grouped = out.groupby("patient_id", sort=False)
    varying = grouped.nunique(dropna=False).gt(1).any()
    endpoint_columns = [c for c in out.columns if c.startswith(("time", "event"))]
    inconsistent = [c for c in endpoint_columns if varying.get(c, False)]
    if inconsistent:
        counts = grouped[inconsistent].nunique(dropna=False)
        patients = counts.index[counts.gt(1).any(axis=1)]
        raise InputError(
            f"patients {id_list(patients)} have different survival values on different rows ({inconsistent})",
            where=where,
            fix="one time and censorship per patient: correct the rows",
        )
    dropped = [c for c in out.columns if varying.get(c, False)]
    if dropped:
        log.info("columns that differ between rows of one patient are dropped (slide-level): %s", ", ".join(dropped))
    result = grouped.first().reset_index()
    result = result[[c for c in result.columns if c not in dropped]]
    result["event"] = result["event"].astype(int)
    return result
