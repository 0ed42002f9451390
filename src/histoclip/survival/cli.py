"""``python -m histoclip.survival from-censorship IN OUT``: a CLAM/SurvPath table → our clinical table.

Why a command: those tables say ``censorship`` (1 = censored) and often hold one row per slide; converting them
once, to ``patient_id``/``time``/``event``, is safer than configuring every endpoint the other way round.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from histoclip.survival.endpoints import event_table_from_censorship

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m histoclip.survival from-censorship IN OUT``: a CLAM/SurvPath table → our clinical table."""
    parser = argparse.ArgumentParser(prog="python -m histoclip.survival", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser(
        "from-censorship",
        help="convert a table with censorship (1 = censored), possibly one row per slide, to patient_id/time/event",
    )
    convert.add_argument("table", help="input table (.csv or TSV)")
    convert.add_argument("output", help="output clinical table (TSV)")
    convert.add_argument("--patient-column", default="case_id")
    convert.add_argument("--time-column", default="survival_months")
    convert.add_argument("--censorship-column", default="censorship")
    convert.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="NAME=TIME,CENSORSHIP",
        help="a further endpoint, written as time_NAME / event_NAME (e.g. dss=survival_months_dss,censorship_dss)",
    )
    args = parser.parse_args(argv)
    endpoints = {}
    for spec in args.endpoint:
        name, _, columns = spec.partition("=")
        time_col, _, censor_col = columns.partition(",")
        if not (name and time_col and censor_col):
            parser.error(f"--endpoint {spec!r}: write NAME=TIME_COLUMN,CENSORSHIP_COLUMN")
        endpoints[name] = (time_col, censor_col)
    path = Path(args.table)
    table = pd.read_csv(path, sep="," if path.suffix.lower() == ".csv" else "\t", dtype=str, keep_default_na=False)
    out = event_table_from_censorship(
        table,
        patient_column=args.patient_column,
        time_column=args.time_column,
        censorship_column=args.censorship_column,
        endpoints=endpoints,
        where=str(path),
    )
    from histoclip.plots import write_tsv

    write_tsv(out, args.output)
    print(f"{len(out)} patients, {int(out['event'].sum())} events -> {args.output}")
    return 0
