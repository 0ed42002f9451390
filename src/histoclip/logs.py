"""Logging for rule scripts: everything a job says goes to its Snakemake log file.

On a cluster the log file is the only thing anyone reads after a failure, so an exception is written there
(with the message first, traceback after) before it propagates and fails the job.

Why the ``histoclip`` logger stops propagating to the root logger for the block: libraries configure the root
logger behind our back (open_clip calls ``logging.info``, which runs ``logging.basicConfig`` when the root has no
handler; timm's ``setup_default_logging`` adds one), and a record reaching both our handlers and the root's is
printed twice, once formatted and once as ``INFO:histoclip…``.

Why the console gets less than the log file: a failed job's stderr is what Snakemake shows (and a cluster's job
output), read by a person scanning for the one line that says which slide broke and why. An error in the user's
input (:class:`~histoclip.errors.InputError`: a bad slide, a sheet row) already names where and how to fix it, so
the console gets its message alone, once; its traceback (with a worker process's ``_RemoteTraceback``) goes only to
the log file, for whoever debugs the code. A bug (any other exception) keeps its traceback on the console too.
Either way the exception is printed once: the interpreter's own report of it, at the exit of the job's process,
is left out (:func:`_quiet_excepthook`). Records logged with ``extra=FILE_ONLY`` reach the log file only.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: ``extra=`` of a record meant for the log file only (e.g. a per-slide traceback that a summary reports later).
FILE_ONLY = {"histoclip_file_only": True}
#: Attribute set on an exception rule_log has logged, so that it is not printed again at the process's exit.
_LOGGED = "_histoclip_logged"


class ConsoleFormatter(logging.Formatter):
    """:data:`FORMAT` without the traceback of an :class:`~histoclip.errors.InputError` (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        from histoclip.errors import InputError

        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, InputError):
            return super().format(record)
        quiet = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return super().format(quiet)


def _console_only_what_is_meant_for_it(record: logging.LogRecord) -> bool:
    return not getattr(record, "histoclip_file_only", False)


def _quiet_excepthook(previous: Any) -> Any:
    """An ``sys.excepthook`` that stays silent for exceptions rule_log has already logged (the process still exits
    with status 1) and hands every other one to ``previous``."""

    def hook(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
        if getattr(value, _LOGGED, False):
            return
        previous(kind, value, traceback)

    hook.histoclip_quiet = True  # type: ignore[attr-defined]
    return hook


@contextlib.contextmanager
def rule_log(log_path: str | Path | None, name: str = "histoclip") -> Iterator[logging.Logger]:
    """Send the ``histoclip`` logger (and Python warnings) to ``log_path`` and stderr for the block, and only
    there; an exception leaving the block is logged once and re-raised (see the module docstring)."""
    root = logging.getLogger("histoclip")
    root.setLevel(logging.INFO)
    propagate, root.propagate = root.propagate, False
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ConsoleFormatter(FORMAT))
    console.addFilter(_console_only_what_is_meant_for_it)
    handlers: list[logging.Handler] = [console]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
        handlers[-1].setFormatter(logging.Formatter(FORMAT))
    for handler in handlers:
        root.addHandler(handler)
    logging.captureWarnings(True)
    logger = logging.getLogger(name)
    try:
        yield logger
    except Exception as exc:
        logger.error("%s", exc, exc_info=True)
        with contextlib.suppress(AttributeError):
            setattr(exc, _LOGGED, True)
        if not getattr(sys.excepthook, "histoclip_quiet", False):
            sys.excepthook = _quiet_excepthook(sys.excepthook)
        raise
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.propagate = propagate
