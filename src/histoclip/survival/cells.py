"""Cells of the clinical and slide-level tables as the survival stage reads them: numbers, missing markers, labels.

Why one module: the clinical table is written by hand, so a number may sit beside ``NA``, ``.`` or an empty cell,
and a label may be ``2`` or ``10``. Endpoints, patient aggregation, model terms and Kaplan–Meier groupings must
read those cells the same way, or a patient counted as missing in one table would be a level in another.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

__all__ = [
    "MAX_LEVELS",
    "MISSING",
    "id_list",
    "is_missing",
    "levels_by_count",
    "natural_key",
    "natural_rank",
    "numeric",
    "text",
]

#: Cell values read as missing (compared lower-case, after stripping).
MISSING = {"", "na", "nan", "none", "null", "n/a", "."}
#: Text columns with more levels than this are almost certainly a continuous column by mistake (too many levels for
#: indicators or Kaplan–Meier groups).
MAX_LEVELS = 20


def is_missing(text_values: pd.Series) -> pd.Series:
    """Mask of stripped text cells that are missing markers."""
    return text_values.str.lower().isin(MISSING)


def numeric(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(numbers with missing markers as NaN, mask of cells that are neither missing nor a number)."""
    if pd.api.types.is_numeric_dtype(values):
        return values.astype(float), pd.Series(False, index=values.index)
    stripped = values.astype(str).str.strip()
    missing = is_missing(stripped) | values.isna()
    numbers = pd.to_numeric(stripped.where(~missing), errors="coerce")
    return numbers, numbers.isna() & ~missing


def text(values: pd.Series) -> pd.Series:
    """Stripped text of every cell, missing markers as NaN: a column read as categories."""
    stripped = values.astype(str).str.strip()
    return stripped.where(~is_missing(stripped))


def id_list(ids: Iterable[Any], limit: int = 20) -> str:
    """Ids for a message, the first ``limit`` of them: enough to find the rows without flooding the log."""
    ids = [str(i) for i in ids]
    shown = ", ".join(ids[:limit])
    return shown + (f" … and {len(ids) - limit} more" if len(ids) > limit else "")


def natural_key(label: Any) -> tuple[int, float, str]:
    """Sort key that puts numeric labels in numeric order (cluster 2 before cluster 10), then text labels."""
    label_text = str(label)
    try:
        return (0, float(label_text), label_text)
    except ValueError:
        return (1, 0.0, label_text)


def natural_rank(labels: pd.Series) -> pd.Series:
    """Rank of every label in natural order (for sorting frames by label without a key function)."""
    order = {v: i for i, v in enumerate(sorted(labels.unique(), key=natural_key))}
    return labels.map(order)


def levels_by_count(values: pd.Series) -> list[Any]:
    """Levels of ``values``, the most frequent first (ties: natural order): the first is a term's reference."""
    counts = values.value_counts()
    return sorted(counts.index, key=lambda v: (-counts[v], natural_key(v)))
