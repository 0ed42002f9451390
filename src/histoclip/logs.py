"""Logging for rule scripts: everything a job says goes to its Snakemake log file.

On a cluster the log file is the only thing anyone reads after a failure, so an exception is written there
(with the message first, traceback after) before it propagates and fails the job.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def rule_log(log_path: str | Path | None, name: str = "histoclip") -> Iterator[logging.Logger]:
    """Send the ``histoclip`` logger (and Python warnings) to ``log_path`` and stderr for the block."""
    root = logging.getLogger("histoclip")
    root.setLevel(logging.INFO)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    logging.captureWarnings(True)
    logger = logging.getLogger(name)
    try:
        yield logger
    except Exception as exc:
        logger.error("%s", exc, exc_info=True)
        raise
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
