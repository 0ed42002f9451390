"""Errors a user can act on.

Every message names where the problem is (file, row, column or slide) and how to fix it, because a
cohort run is usually debugged from a log file long after the person who started it has moved on.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a sheet, a table, a config value or a slide.

    ``where`` is the file (and row/column) or slide id; ``fix`` says what to change.
    """

    def __init__(self, problem: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.problem = problem
        self.where = where
        self.fix = fix
        parts = [f"{where}: {problem}" if where else problem]
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(parts))

    def __reduce__(self) -> tuple:
        # picklable (errors raised in worker processes come back to the job's process this way)
        return (_rebuild, (type(self), self.__dict__, self.args))


class SlideError(InputError):
    """A slide that cannot be opened, read or measured (mpp)."""

    def __init__(self, slide_id: str, problem: str, *, fix: str | None = None) -> None:
        self.slide_id = slide_id
        super().__init__(problem, where=f"slide {slide_id!r}", fix=fix)


class InputErrors(InputError):
    """Several problems found in one pass over a file (a sheet, a table, the config), each an :class:`InputError`.

    They are reported together so a user fixes them all in one go instead of one per run; ``problems`` keeps
    them apart so the preflight table (histoclip.preflight) can list them one per line.
    """

    def __init__(self, summary: str, problems: list[InputError], *, where: str | None = None) -> None:
        self.problems = list(problems)
        super().__init__(summary + ":\n  - " + "\n  - ".join(str(p) for p in self.problems), where=where)


def _rebuild(cls: type[InputError], state: dict, args: tuple) -> InputError:
    error = cls.__new__(cls)
    error.__dict__.update(state)
    error.args = args
    return error
