"""Cross-validated MIL: every labelled slide called by a model that never saw its patient.

For a task (a sheet column and its classes) and a model (abmil or mean): patients are dealt into k stratified
folds (:mod:`histoclip.mil.folds`); for each fold, a model is trained on the other folds' patients, with a
stratified share of them held back for early stopping (:mod:`histoclip.mil.train`), and calls the fold's slides.
The calls table has the zero-shot calls' columns (``slide_id``, ``call``, ``p_<class>``, ``margin``,
``abstain``, ``best``, ``n_tiles``, ``status``, ``label``, ``split``) plus ``fold`` and ``patient_id``, so the
zero-shot evaluation code scores it as it is (:func:`evaluate_calls`). The k fold models together are the
trained model that is saved and deployed (:mod:`histoclip.mil.saved`): a new slide is called by the mean of
their probabilities.

Slides of the sheet that cannot be used (no label, a label outside the classes, no tiles) are listed with an
empty call and a ``status`` saying why, so the table always has every slide of the sheet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from histoclip import formats
from histoclip.bags import BagReader
from histoclip.errors import InputError
from histoclip.mil.folds import patient_folds, patient_strata, validation_split
from histoclip.mil.models import build_model
from histoclip.mil.settings import MilSettings, MilTask
from histoclip.mil.train import FoldFit, predict, resolve_device, train_model
from histoclip.zeroshot.evaluation import evaluate

__all__ = ["MilResult", "calls_frame", "evaluate_calls", "labelled_slides", "run_mil", "task_classes"]

log = logging.getLogger(__name__)

#: Called with (slide id, x, y, attention, fold) for every slide called, so attention goes to disk slide by slide.
AttentionSink = Callable[[str, np.ndarray, np.ndarray, np.ndarray, str], None]


def task_classes(task: MilTask, labels: Sequence[str], *, where: str) -> list[str]:
    """The task's classes: as configured, or every non-empty value of its column, sorted."""
    values = sorted({str(v) for v in labels if str(v) != ""})
    classes = list(task.classes) if task.classes else values
    if len(classes) < 2:
        raise InputError(
            f"task {task.name!r} needs at least 2 classes in column {task.label_column!r}, found {values}",
            where=where,
            fix=f"fill the column {task.label_column!r} of the cohort sheet, or set mil.tasks.{task.name}.classes",
        )
    return classes


def labelled_slides(sheet: pd.DataFrame, task: MilTask, n_tiles: Mapping[str, int], *, where: str) -> pd.DataFrame:
    """The sheet's slides (``slide_id``, ``patient_id``, ``label`` from the task's column, ``split``, ``n_tiles``)
    and ``status``: ok, or why a slide is not used."""
    if task.label_column not in sheet.columns:
        raise InputError(
            f"task {task.name!r} reads the column {task.label_column!r}, which the sheet does not have "
            f"(columns: {list(sheet.columns)})",
            where=where,
            fix=f"add the column to the sheet, or set mil.tasks.{task.name}.label_column to one it has",
        )
    frame = pd.DataFrame(
        {
            "slide_id": sheet["slide_id"].astype(str),
            "patient_id": sheet["patient_id"].astype(str),
            "label": sheet[task.label_column].fillna("").astype(str),
            "split": sheet["split"].fillna("").astype(str) if "split" in sheet.columns else "",
        }
    )
    frame["n_tiles"] = frame["slide_id"].map(lambda s: int(n_tiles.get(s, 0)))
    classes = task_classes(task, frame["label"], where=where)
    status = np.where(frame["label"] == "", "no label", "ok")
    status = np.where((frame["label"] != "") & ~frame["label"].isin(classes), "label not among the classes", status)
    status = np.where((status == "ok") & (frame["n_tiles"] == 0), "no tiles", status)
    frame["status"] = status
    return frame


@dataclass
class MilResult:
    """The calls of every sheet slide, the fold models and what the log and the saved model record."""

    calls: pd.DataFrame
    classes: list[str]
    fits: list[FoldFit]
    folds: list[dict[str, Any]] = field(default_factory=list)


def calls_frame(
    slides: pd.DataFrame, classes: Sequence[str], probabilities: Mapping[str, np.ndarray], folds: Mapping[str, Any]
) -> pd.DataFrame:
    """The calls table of ``slides`` (:func:`labelled_slides`' frame, or any with slide_id, n_tiles, status):
    ``call``/``best`` = the most probable class, ``margin`` = its probability minus the next one's, ``abstain``
    false (MIL always answers), ``fold`` = the fold whose model called the slide ("" when none did)."""
    rows = []
    for record in slides.to_dict("records"):
        p = probabilities.get(record["slide_id"])
        row: dict[str, Any] = {"slide_id": record["slide_id"]}
        if p is None:
            row |= {"call": "", **{formats.probability_column(c): np.nan for c in classes}, "margin": np.nan}
            row |= {"abstain": False, "best": ""}
        else:
            order = np.argsort(-p, kind="stable")
            best = classes[int(order[0])]
            row |= {"call": best, **{formats.probability_column(c): float(v) for c, v in zip(classes, p, strict=True)}}
            row |= {"margin": float(p[order[0]] - p[order[1]]), "abstain": False, "best": best}
        row |= {"n_tiles": int(record.get("n_tiles", 0)), "status": record.get("status", "ok")}
        for column in ("label", "split", "patient_id"):
            if column in record:
                row[column] = record[column]
        row["fold"] = folds.get(record["slide_id"], "")
        rows.append(row)
    return pd.DataFrame(rows)


def run_mil(
    model_name: str,
    task: MilTask,
    slides: pd.DataFrame,
    bags: BagReader,
    settings: MilSettings,
    *,
    where: str,
    attention_sink: AttentionSink | None = None,
) -> MilResult:
    """Cross-validate ``model_name`` on ``slides`` (:func:`labelled_slides`): k fold models, every usable slide
    called by the model of its fold. ``attention_sink`` receives each called slide's tile attention."""
    classes = task_classes(task, slides["label"], where=where)
    usable = slides[slides["status"] == "ok"].reset_index(drop=True)
    strata = patient_strata(usable["patient_id"], usable["label"], where=where)
    fold_of_patient = patient_folds(strata, settings.folds, settings.seed, where=where)
    k = int(fold_of_patient.max()) + 1
    fold_of_slide = usable["patient_id"].map(fold_of_patient).to_numpy()
    index = {c: i for i, c in enumerate(classes)}
    device = resolve_device(settings.device)
    if device.type == "cpu":
        # small models on bags of a few thousand tiles: more threads than the job's cores only spin
        torch.set_num_threads(settings.threads)
    dim = bags.dim(usable["slide_id"].tolist())
    probabilities: dict[str, np.ndarray] = {}
    fits: list[FoldFit] = []
    records: list[dict[str, Any]] = []
    for fold in range(k):
        test = usable[fold_of_slide == fold]
        rest = usable[fold_of_slide != fold]
        held = validation_split(
            strata[rest["patient_id"].unique()].sort_index(), settings.validation_fraction, settings.seed, fold
        )
        is_val = rest["patient_id"].map(held).to_numpy(dtype=bool)
        train, val = rest[~is_val], rest[is_val]
        fit = train_model(
            model_name,
            dim,
            len(classes),
            (train["slide_id"].tolist(), train["label"].map(index).tolist()),
            (val["slide_id"].tolist(), val["label"].map(index).tolist()),
            bags,
            settings,
            device,
            seed=[settings.seed, fold, 7],
        )
        fits.append(fit)
        model = load_state(model_name, dim, len(classes), settings.architecture(), fit.state, device)
        for bag, p, attention in predict([model], bags, test["slide_id"].tolist(), device):
            probabilities[bag.slide_id] = p
            if attention_sink is not None:
                attention_sink(bag.slide_id, bag.x, bag.y, attention, str(fold))
        record = {
            "fold": fold,
            "train_slides": len(train),
            "validation_slides": len(val),
            "test_slides": len(test),
            "train_patients": int(train["patient_id"].nunique()),
            "test_patients": int(test["patient_id"].nunique()),
            "best_epoch": fit.best_epoch,
            "epochs_run": fit.epochs_run,
            "best_validation_loss": fit.best_validation_loss,
        }
        records.append(record)
        log.info(
            "%s / %s fold %d of %d: %d training slides (%d for early stopping), %d test slides; best epoch %d of %d",
            model_name,
            task.name,
            fold + 1,
            k,
            len(train),
            len(val),
            len(test),
            fit.best_epoch,
            fit.epochs_run,
        )
    folds = dict(zip(usable["slide_id"], fold_of_slide.tolist(), strict=True))
    return MilResult(calls_frame(slides, classes, probabilities, folds), classes, fits, records)


def load_state(
    model_name: str, dim: int, n_classes: int, architecture: Mapping[str, Any], state: Mapping[str, Any], device: Any
) -> Any:
    """A model rebuilt from its weights, ready to call slides."""
    model = build_model(model_name, dim, n_classes, architecture["hidden_dim"], architecture["dropout"])
    model.load_state_dict(dict(state), strict=True)
    return model.to(device).eval()


def evaluate_calls(calls: pd.DataFrame, classes: Sequence[str], *, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """The zero-shot evaluation (balanced accuracy, macro AUC, κ with bootstrap intervals) of the called slides
    with a label among ``classes``; ``slides`` lists them. With a split column, ``held_out`` scores only the
    slides outside the train split (the ones zero-shot and few-shot are scored on)."""
    scored = calls[(calls["call"] != "") & calls["label"].isin(classes)]
    probs = scored[[formats.probability_column(c) for c in classes]].to_numpy()
    result = evaluate(
        scored["label"].tolist(), scored["call"].tolist(), probs, list(classes), n_bootstrap=n_bootstrap, seed=seed
    )
    result["slides"] = scored["slide_id"].tolist()
    if "split" in scored.columns and (scored["split"].str.lower() == "train").any():
        outside = scored[scored["split"].str.lower() != "train"]
        if len(outside):
            held = evaluate(
                outside["label"].tolist(),
                outside["call"].tolist(),
                outside[[formats.probability_column(c) for c in classes]].to_numpy(),
                list(classes),
                n_bootstrap=n_bootstrap,
                seed=seed,
            )
            result["held_out"] = held | {"slides": outside["slide_id"].tolist()}
    return result
