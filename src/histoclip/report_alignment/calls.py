"""Report-style slide zero-shot through the aligned space, evaluated and compared with tile-level zero-shot.

The classes and synonyms are the zero-shot prompt set's called classes; the templates are sentences as a
report words a diagnosis ("Findings consistent with CLASSNAME."), because the aligned space was learnt from
reports. The class vector is the prompt ensemble of :func:`histoclip.zeroshot.classifier.class_weights` (kept
as a text classifier file by rule encode_reports), mapped by the aligner's text projection; a slide's score per
class is its cosine with the aligned slide vector, and probabilities, calls and abstentions are those of
tile-level zero-shot (:func:`~histoclip.zeroshot.classifier.call_slide`), with the aligner's learnt logit scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from histoclip.formats import TextClassifier, probability_column
from histoclip.zeroshot.classifier import call_slide
from histoclip.zeroshot.evaluation import evaluate, evaluated_slides
from histoclip.zeroshot.prompts import PromptSet

__all__ = ["compare_with_tile_zeroshot", "report_style_calls", "report_style_prompt_set"]


def report_style_prompt_set(prompt_set: PromptSet, templates: Sequence[str]) -> PromptSet:
    """The called classes of ``prompt_set`` with its synonyms and the report-style ``templates`` (CLASSNAME)."""
    if not templates:
        raise ValueError("report_alignment.templates is empty: give at least one report-style template")
    classes = {cls: prompt_set.synonyms(cls) for cls in prompt_set.called_classes}
    return PromptSet.hashed(
        f"{prompt_set.name}-report-style",
        classes,
        {},
        {cls: tuple(templates) for cls in classes},
        f"report-style templates over the called classes of {prompt_set.name}",
    )


def report_style_calls(
    slide_ids: Sequence[str],
    slide_vectors: np.ndarray,
    class_vectors: np.ndarray,
    classifier: TextClassifier,
    logit_scale: float,
    abstain_margin: float,
    info: pd.DataFrame,
) -> pd.DataFrame:
    """The calls table (slide_id, call, p_<class>, margin, abstain, best, n_tiles, status[, label, split]) of
    slides with aligned vectors ``[S, D]`` against aligned class vectors ``[C, D]`` (the classifier's rows)."""
    called = classifier.called_classes
    rows = []
    scores = np.asarray(slide_vectors, dtype=np.float64) @ np.asarray(class_vectors, dtype=np.float64).T
    for slide, row_scores in zip(slide_ids, scores, strict=True):
        result = call_slide(row_scores, called, logit_scale, abstain_margin)
        row: dict[str, Any] = {"slide_id": slide, "call": result.call or ""}
        row |= {probability_column(c): result.probabilities[c] for c in called}
        row |= {"margin": result.margin, "abstain": result.abstain, "best": result.best}
        rows.append(row)
    calls = pd.DataFrame(rows)
    calls = calls.merge(info, on="slide_id", how="left")
    calls["status"] = "ok"
    columns = ["slide_id", "call", *map(probability_column, called), "margin", "abstain", "best", "n_tiles", "status"]
    return calls[columns + [c for c in ("label", "split") if c in calls.columns]]


def _scored(calls: pd.DataFrame, called: Sequence[str], slides: Sequence[str], bootstrap: int, seed: int) -> dict:
    subset = calls.set_index("slide_id").loc[list(slides)].reset_index()
    predictions = [c if c else None for c in subset["call"]]
    probs = subset[[probability_column(c) for c in called]].to_numpy(dtype=np.float64)
    return evaluate(subset["label"].tolist(), predictions, probs, list(called), n_bootstrap=bootstrap, seed=seed)


def compare_with_tile_zeroshot(
    report_calls: pd.DataFrame,
    tile_calls: pd.DataFrame,
    called: Sequence[str],
    bootstrap: int,
    seed: int,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Evaluation of the report-style calls (existing evaluation code) and the comparison table: both methods
    on exactly the same slides (labelled, held out, called by both)."""
    ours = evaluated_slides(report_calls, called)
    theirs = evaluated_slides(tile_calls, called)
    slides = [s for s in ours["slide_id"] if s in set(theirs["slide_id"])]
    evaluation = _scored(report_calls, called, slides, bootstrap, seed)
    evaluation["slides"] = slides
    baseline = _scored(tile_calls, called, slides, bootstrap, seed)
    rows = []
    for method, result in (("report-style (aligned slide)", evaluation), ("tile-level top-K zero-shot", baseline)):
        interval = result.get("ci", {}).get("balanced_accuracy") or {}
        rows.append(
            {
                "method": method,
                "n": result["n"],
                "balanced_accuracy": result["balanced_accuracy"],
                "low_95": interval.get("low"),
                "high_95": interval.get("high"),
                "macro_auc": result.get("macro_auc"),
            }
        )
    return evaluation, pd.DataFrame(rows)
