"""The MIL stage's jobs end to end, file in, files out: what the rule scripts and ``histoclip deploy`` call.

:func:`train_task` cross-validates one MIL model on one task and writes its calls, evaluation, per-fold training
record, attention files and the saved model; :func:`deploy_cohort` calls a cohort with a saved model. The
sheet and the embedding manifest are read here, so that a script only hands over paths.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from histoclip import formats, store
from histoclip.bags import BagReader
from histoclip.mil.crossval import evaluate_calls, labelled_slides, run_mil
from histoclip.mil.saved import deploy, load_mil_model, save_mil_model
from histoclip.mil.settings import MilSettings, MilTask
from histoclip.sheets import sheet_frame

__all__ = ["MilOutputs", "deploy_cohort", "train_task"]

log = logging.getLogger(__name__)

#: Embedding-footer keys copied into a saved model's provenance.
EMBEDDING_PROVENANCE = ("model_name", "architecture", "weights_sha256", "dim", "preprocessing", "backend")


def _bags(
    manifest: str | Path, slide_ids: Sequence[str], cache_mb: int = 0
) -> tuple[BagReader, dict[str, int], dict[str, Any]]:
    """The bag reader over the manifest's files (keeping up to ``cache_mb`` of bags once read), each slide's tile
    count and the embedding provenance (footers)."""
    paths = dict(zip(slide_ids, formats.embedding_paths(manifest, slide_ids), strict=True))
    footers = {s: formats.read_embedding_footer(p) for s, p in paths.items()}
    n_tiles = {s: f.n_rows for s, f in footers.items()}
    first = next((f for f in footers.values() if f.n_rows), None)
    provenance = {k: first.metadata.get(k) for k in EMBEDDING_PROVENANCE} if first else {}
    return BagReader(paths, cache_mb * 2**20), n_tiles, provenance


@dataclass(frozen=True)
class MilOutputs:
    """Where :func:`train_task` writes."""

    calls: str | Path
    evaluation: str | Path
    folds: str | Path
    model: str | Path
    attention: str | Path


def _sink(folder: str | Path, task: str, mil_model: str):  # noqa: ANN202 (a closure)
    Path(folder).mkdir(parents=True, exist_ok=True)

    def write(slide_id: str, x: Any, y: Any, attention: Any, fold: str) -> None:
        metadata = {"slide_id": slide_id, "task": task, "mil_model": mil_model, "fold": fold}
        formats.write_attention(Path(folder) / f"{slide_id}.parquet", x, y, attention, metadata)

    return write


def train_task(
    mil_model: str,
    task: MilTask,
    sheet: str | Path,
    manifest: str | Path,
    settings: MilSettings,
    outputs: MilOutputs,
    *,
    n_bootstrap: int = 1000,
) -> dict[str, Any]:
    """Cross-validate ``mil_model`` on ``task`` and write every output; returns the evaluation."""
    frame = sheet_frame(sheet)
    bags, n_tiles, provenance = _bags(manifest, frame["slide_id"].tolist(), settings.bag_cache_mb)
    where = f"cohort sheet {sheet}, task {task.name}"
    slides = labelled_slides(frame, task, n_tiles, where=where)
    for status, count in slides["status"].value_counts().items():
        if status != "ok":
            log.warning("%s: %d slide(s) not used: %s", task.name, count, status)
    result = run_mil(
        mil_model,
        task,
        slides,
        bags,
        settings,
        where=where,
        attention_sink=_sink(outputs.attention, task.name, mil_model),
    )
    formats.write_calls(outputs.calls, result.calls)
    evaluation = evaluate_calls(result.calls, result.classes, n_bootstrap=n_bootstrap, seed=settings.seed)
    evaluation |= {"task": task.name, "label_column": task.label_column, "mil_model": mil_model, "folds": result.folds}
    store.write_text_atomic(outputs.evaluation, json.dumps(evaluation, indent=2, default=float) + "\n")
    history = [{"fold": i} | step for i, fit in enumerate(result.fits) for step in fit.history]
    store.write_tsv(pd.DataFrame(history, columns=["fold", "epoch", "train_loss", "validation_loss"]), outputs.folds)
    info = {
        "task": task.name,
        "label_column": task.label_column,
        "classes": result.classes,
        "mil_model": mil_model,
        "architecture": settings.architecture(),
        "dim": bags.dim([s for s, n in n_tiles.items() if n][:1]),
        "embedding": provenance,
        "settings": {k: v for k, v in vars(settings).items()},
        "folds": result.folds,
        "fold_slides": {
            str(f): sorted(result.calls.loc[result.calls["fold"] == f, "slide_id"]) for f in range(len(result.fits))
        },
        "cross_validated": {
            "balanced_accuracy": evaluation["balanced_accuracy"],
            "balanced_accuracy_ci": evaluation["ci"]["balanced_accuracy"],
            "macro_auc": evaluation["macro_auc"],
            "n": evaluation["n_scored"],
        },
        "sheet": str(sheet),
    }
    save_mil_model(outputs.model, [fit.state for fit in result.fits], info)
    return evaluation


def deploy_cohort(
    model_file: str | Path,
    sheet: str | Path,
    manifest: str | Path,
    calls: str | Path,
    *,
    attention: str | Path | None = None,
    device: str = "auto",
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Call every slide of ``sheet`` with a saved MIL model; write the calls (and attention files). When the sheet
    has the model's label column with its classes, the calls are scored too (returned; None otherwise)."""
    saved = load_mil_model(model_file)
    frame = sheet_frame(sheet)
    bags, n_tiles, _ = _bags(manifest, frame["slide_id"].tolist())
    column = saved.info["label_column"]
    slides = pd.DataFrame(
        {
            "slide_id": frame["slide_id"],
            "patient_id": frame["patient_id"],
            "label": frame[column].astype(str) if column in frame.columns else "",
            "split": frame["split"].astype(str) if "split" in frame.columns else "",
            "n_tiles": frame["slide_id"].map(n_tiles).astype(int),
        }
    )
    slides["status"] = slides["n_tiles"].map(lambda n: "ok" if n else "no tiles")
    sink = _sink(attention, saved.info["task"], saved.info["mil_model"]) if attention is not None else None
    result = deploy(saved, slides, bags, device=device, attention_sink=sink)
    formats.write_calls(calls, result)
    if slides["label"].isin(saved.classes).any():
        return evaluate_calls(result, saved.classes, n_bootstrap=n_bootstrap, seed=seed)
    return None
