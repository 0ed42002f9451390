"""Logging for rule scripts: everything a job says goes to its Snakemake log file.

On a cluster the log file is the only thing anyone reads after a failure, so an exception is written there
(with the message first, traceback after) before it propagates and fails the job.

Why the ``histoclip`` logger stops propagating to the root logger for the block: libraries configure the root
logger behind our back (open_clip calls ``logging.info``, which runs ``logging.basicConfig`` when the root has no
handler; timm's ``setup_default_logging`` adds one), and a record reaching both our handlers and the root's is
printed twice, once formatted and once as ``INFO:histoclip…``.
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
    """Send the ``histoclip`` logger (and Python warnings) to ``log_path`` and stderr for the block, and only
    there (see the module docstring)."""
    root = logging.getLogger("histoclip")
    root.setLevel(logging.INFO)
    propagate, root.propagate = root.propagate, False
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
        root.propagate = propagate
