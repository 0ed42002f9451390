"""The rows of the preflight table: one :class:`Problem` per thing a run would trip over."""

from __future__ import annotations

from dataclasses import dataclass

from histoclip.errors import InputError, InputErrors

#: Columns of the preflight table, in order.
COLUMNS = ("severity", "what", "slide_id", "where", "problem", "fix")
#: Severities, most serious first (the table's sort order).
SEVERITIES = ("error", "skip", "warning")
#: What a problem is about, in the table's sort order.
SUBJECTS = ("config", "output", "sheet", "clinical", "prompts", "model", "slide")


@dataclass(frozen=True)
class Problem:
    """One line of the preflight table."""

    severity: str
    what: str
    where: str
    problem: str
    fix: str = ""
    slide_id: str = ""


def problems_from(error: InputError, what: str, *, severity: str = "error", slide_id: str = "") -> list[Problem]:
    """The rows of an :class:`InputError` (one per problem of an :class:`InputErrors`)."""
    items = error.problems if isinstance(error, InputErrors) else [error]
    rows = []
    for item in items:
        where = item.where or (error.where or "")
        rows.append(Problem(severity, what, where, item.problem.strip(), (item.fix or "").strip(), slide_id))
    return rows
