"""The preflight's report: the problem table, the per-slide table, and the summary for a terminal."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from histoclip.preflight.problems import COLUMNS, SEVERITIES, SUBJECTS, Problem
from histoclip.preflight.slides import SLIDE_COLUMNS, SlideCheck


@dataclass
class PreflightReport:
    """Every problem found, the per-slide checks, and how long it took."""

    problems: list[Problem]
    slides: list[SlideCheck]
    seconds: float
    slide_seconds: float = 0.0

    def count(self, severity: str) -> int:
        return sum(problem.severity == severity for problem in self.problems)

    @property
    def ok(self) -> bool:
        return self.count("error") == 0

    def table(self) -> pd.DataFrame:
        """One row per problem, errors first, then by subject, in the order found."""
        rows = [asdict(problem) for problem in self.problems]
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        if frame.empty:
            return frame
        frame["_s"] = frame["severity"].map(SEVERITIES.index)
        frame["_w"] = frame["what"].map(lambda w: SUBJECTS.index(w) if w in SUBJECTS else len(SUBJECTS))
        frame = frame.sort_values(["_s", "_w"], kind="stable").drop(columns=["_s", "_w"])
        return frame.reset_index(drop=True)

    def slide_table(self) -> pd.DataFrame:
        return pd.DataFrame(
            [{column: getattr(check, column) for column in SLIDE_COLUMNS} for check in self.slides],
            columns=list(SLIDE_COLUMNS),
        )

    def summary(self) -> str:
        per_thousand = self.slide_seconds / len(self.slides) * 1000 if self.slides else 0.0
        return (
            f"preflight: {len(self.slides)} slide(s) checked in {self.slide_seconds:.1f} s "
            f"({per_thousand:.1f} s per 1,000 slides), {self.seconds:.1f} s in all: "
            f"{self.count('error')} error(s), {self.count('skip')} slide(s) to be skipped, "
            f"{self.count('warning')} warning(s)"
        )


def _clean(value: Any) -> Any:
    return " ".join(value.split()) if isinstance(value, str) else value


def write_report(report: PreflightReport, table_path: str | Path, slides_path: str | Path | None = None) -> None:
    """The problem table (and the per-slide table) as TSV, written atomically; one line per problem."""
    from histoclip.store import write_text_atomic

    table = report.table().map(_clean)
    write_text_atomic(table_path, table.to_csv(sep="\t", index=False))
    if slides_path is not None:
        slides = report.slide_table().map(_clean)
        write_text_atomic(slides_path, slides.to_csv(sep="\t", index=False, float_format="%.6g"))


def describe(report: PreflightReport, table_path: str | Path | None = None, limit: int = 20) -> str:
    """The summary line and the first ``limit`` errors, for a terminal or a log."""
    lines = [report.summary()]
    if table_path is not None:
        lines.append(f"one line per problem in {table_path}")
    table = report.table()
    shown = table[table["severity"] != "warning"].head(limit) if not table.empty else table
    for row in shown.itertuples():
        fix = f" Fix: {row.fix}" if row.fix else ""
        lines.append(f"  {row.severity.upper()} [{row.what}] {row.where}: {row.problem}{fix}")
    hidden = int((table["severity"] != "warning").sum()) - len(shown) if not table.empty else 0
    if hidden > 0:
        lines.append(f"  ... and {hidden} more (see the table)")
    return "\n".join(lines)
