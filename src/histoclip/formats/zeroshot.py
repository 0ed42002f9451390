"""Zero-shot files: the text classifier, tile scores and the calls table (``results/zeroshot/{model}/{set}/``).

* ``text_classifier.parquet``: one row per class of the prompt set (``class``, ``called``, ``n_prompts``,
  ``weights``), with the prompts' hash, the logit scale and the model's provenance in the footer.
* ``tile_scores/{slide}.parquet``: ``x``, ``y`` and one ``score_<class>`` column per class (background included).
* ``calls.tsv``: one row per slide: ``slide_id``, ``call``, one ``p_<class>`` column per called class (the
  convention :func:`called_classes` parses), ``margin``, ``abstain``, ``best``, ``n_tiles``, ``status`` and,
  when the sheet has them, ``label`` and ``split``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from histoclip import store
from histoclip.errors import InputError

__all__ = [
    "CALLS_TEXT_COLUMNS",
    "PROBABILITY_PREFIX",
    "SCORE_PREFIX",
    "TextClassifier",
    "called_classes",
    "probability_column",
    "read_calls",
    "read_text_classifier",
    "read_tile_scores",
    "read_tile_scores_metadata",
    "write_calls",
    "write_text_classifier",
    "write_tile_scores",
]

#: Prefix of the calls table's per-class probability columns (``p_<class>``).
PROBABILITY_PREFIX = "p_"
#: Prefix of the tile-score files' per-class columns (``score_<class>``).
SCORE_PREFIX = "score_"
#: Columns of calls.tsv read as text ("" where empty, never NaN): ids, answers and the sheet's columns.
CALLS_TEXT_COLUMNS = ("slide_id", "call", "best", "status", "label", "split")


@dataclass(frozen=True)
class TextClassifier:
    classes: list[str]
    called: list[bool]
    weights: np.ndarray
    logit_scale: float
    metadata: dict[str, Any]

    @property
    def called_classes(self) -> list[str]:
        return [c for c, is_called in zip(self.classes, self.called, strict=True) if is_called]


def write_text_classifier(path: str | Path, classifier: TextClassifier, n_prompts: Sequence[int]) -> None:
    """Store the per-class classifier weights (float32), ``n_prompts`` per class, the metadata and the logit scale
    (in the metadata, where :func:`read_text_classifier` finds it)."""
    dim = classifier.weights.shape[1]
    table = pa.table(
        {
            "class": pa.array(classifier.classes, pa.string()),
            "called": pa.array(classifier.called, pa.bool_()),
            "n_prompts": pa.array(list(n_prompts), pa.int32()),
            "weights": pa.FixedSizeListArray.from_arrays(pa.array(classifier.weights.astype(np.float32).ravel()), dim),
        }
    )
    store.write_table_atomic(path, table, {**classifier.metadata, "logit_scale": classifier.logit_scale})


def read_text_classifier(path: str | Path) -> TextClassifier:
    table = pq.read_table(path)
    meta = store.read_metadata(path)
    weights = np.stack(table.column("weights").to_numpy(zero_copy_only=False)).astype(np.float64)
    return TextClassifier(
        table.column("class").to_pylist(), table.column("called").to_pylist(), weights, meta["logit_scale"], meta
    )


def write_tile_scores(
    path: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
    metadata: Mapping[str, Any],
) -> None:
    """One slide's tile scores ``[N, C]`` (stored float32), one ``score_<class>`` column per class."""
    table = pa.table(
        {"x": pa.array(x, pa.int64()), "y": pa.array(y, pa.int64())}
        | {f"{SCORE_PREFIX}{c}": pa.array(scores[:, i].astype(np.float32)) for i, c in enumerate(classes)}
    )
    store.write_table_atomic(path, table, metadata)


def read_tile_scores(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(x, y, {class: scores}) of one slide's tile-score file, classes in column order."""
    table = pq.read_table(path)
    scores = {
        name[len(SCORE_PREFIX) :]: table.column(name).to_numpy().astype(np.float32)
        for name in table.column_names
        if name.startswith(SCORE_PREFIX)
    }
    if not {"x", "y"} <= set(table.column_names) or not scores:
        raise InputError(
            f"not a tile-score file: columns {table.column_names} (expected x, y and score_<class>)",
            where=str(path),
            fix="re-run the zeroshot rule that writes tile_scores/",
        )
    return table.column("x").to_numpy(), table.column("y").to_numpy(), scores


def read_tile_scores_metadata(path: str | Path) -> dict[str, Any]:
    """The footer of a tile-score file (``slide_id``, ``classes``, ``prompt_set``): no rows are read."""
    return store.read_metadata(path)


def probability_column(cls: str) -> str:
    """The calls table's column of a called class's probability."""
    return f"{PROBABILITY_PREFIX}{cls}"


def called_classes(calls: pd.DataFrame) -> list[str]:
    """The called classes of a calls table: its ``p_<class>`` columns, in order."""
    return [c[len(PROBABILITY_PREFIX) :] for c in calls.columns if c.startswith(PROBABILITY_PREFIX)]


def write_calls(path: str | Path, calls: pd.DataFrame) -> None:
    store.write_text_atomic(path, calls.to_csv(sep="\t", index=False, float_format="%.6g"))


def read_calls(path: str | Path) -> pd.DataFrame:
    """The calls table: :data:`CALLS_TEXT_COLUMNS` as text ("" where empty, e.g. the call of a slide that
    abstained), probabilities and margins as floats (NaN for a slide without tiles), ``n_tiles`` as integers."""
    header = pd.read_csv(path, sep="\t", nrows=0).columns
    numeric = [c for c in header if c not in CALLS_TEXT_COLUMNS]
    return pd.read_csv(
        path,
        sep="\t",
        dtype={c: str for c in CALLS_TEXT_COLUMNS if c in header},
        keep_default_na=False,
        na_values={c: [""] for c in numeric},
    )
