"""Zero-shot calls for a cohort: text classifier per (model, prompt set), tile scores, slide calls, evaluation.

The text classifier is computed once per (model, prompt set) and stored with the prompts' hash and the
model's weights hash, so calls made months later can be traced to the exact wording and weights. Slides are
scored one at a time from their embedding files: memory does not grow with the cohort.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histoclip import formats, store
from histoclip.config import SectionSettings, default_config
from histoclip.formats import TextClassifier, probability_column
from histoclip.sheets import SlideRecord
from histoclip.zeroshot.classifier import call_slide, pool, text_classifier, tile_scores
from histoclip.zeroshot.evaluation import evaluate, evaluated_slides
from histoclip.zeroshot.prompts import PromptSet

if TYPE_CHECKING:  # torch only where a model is used: stats-only jobs read classifiers too
    from histoclip.embedding.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallSettings(SectionSettings, section="zeroshot"):
    """How slides are called and evaluated (config key ``zeroshot``, plus the workflow ``seed``)."""

    pooling: str
    top_k: int
    lse_temperature: float
    abstain_margin: float
    bootstrap: int
    seed: int


def write_text_classifier(model: LoadedModel, prompt_set: PromptSet, path: str | Path) -> TextClassifier:
    """Encode every prompt of ``prompt_set`` with ``model`` and store the per-class classifier weights."""
    classes, weights = text_classifier(lambda texts: model.encode_texts(texts).cpu().numpy(), prompt_set)
    called = [c in prompt_set.classes for c in classes]
    meta = {
        "prompt_set": prompt_set.name,
        "prompts_sha256": prompt_set.sha256,
        "logit_scale": model.logit_scale,
        **model.provenance(),
    }
    classifier = TextClassifier(classes, called, weights, model.logit_scale, meta)
    formats.write_text_classifier(path, classifier, [len(prompt_set.prompts(c)) for c in classes])
    return classifier


def call_cohort(
    records: Sequence[SlideRecord],
    embedding_files: Sequence[str | Path],
    classifier: TextClassifier,
    out_dir: str | Path,
    settings: CallSettings | None = None,
) -> pd.DataFrame:
    """Score and call every slide; write tile scores, ``calls.tsv`` and (with labels) the evaluation.

    Outputs in ``out_dir``: ``tile_scores/{slide}.parquet`` (x, y, one ``score_<class>`` column per class,
    background classes included), ``calls.tsv`` (slide_id, call, ``p_<class>`` per called class, margin,
    abstain, best, n_tiles, status, and label/split when the sheet has them), and when labels exist
    ``evaluation.json`` + ``confusion.tsv`` over the evaluated slides (labelled, not in the ``train`` split).
    ``settings`` default to the config schema's.
    """
    settings = settings or CallSettings.from_config(default_config())
    out_dir = Path(out_dir)
    called = classifier.called_classes
    called_columns = [classifier.classes.index(c) for c in called]
    if classifier.metadata.get("weights_sha256") is None:
        raise ValueError("text classifier without model provenance")
    rows = []
    for record, path in zip(records, embedding_files, strict=True):
        x, y, embeddings, meta = formats.read_tile_embeddings(path)
        if meta.get("weights_sha256") != classifier.metadata["weights_sha256"]:
            raise ValueError(
                f"slide {record.slide_id!r}: embeddings in {path} were made with weights "
                f"{str(meta.get('weights_sha256'))[:12]}…, the text classifier with "
                f"{classifier.metadata['weights_sha256'][:12]}…; re-run the embedding step"
            )
        row: dict[str, Any] = {"slide_id": record.slide_id, "n_tiles": len(x), "status": meta.get("status", "ok")}
        scores = tile_scores(embeddings, classifier.weights) if len(x) else np.zeros((0, len(classifier.classes)))
        formats.write_tile_scores(
            out_dir / "tile_scores" / f"{record.slide_id}.parquet",
            x,
            y,
            scores,
            classifier.classes,
            {
                "slide_id": record.slide_id,
                "classes": classifier.classes,
                "prompt_set": classifier.metadata["prompt_set"],
            },
        )
        if len(x) == 0:
            row |= {"call": "", "best": "", "margin": np.nan, "abstain": True}
            row |= {probability_column(c): np.nan for c in called}
            if row["status"] == "ok":
                row["status"] = "no tiles"
        else:
            slide_scores = pool(
                scores[:, called_columns], settings.pooling, k=settings.top_k, temperature=settings.lse_temperature
            )
            result = call_slide(slide_scores, called, classifier.logit_scale, settings.abstain_margin)
            row |= {"call": result.call or "", "best": result.best, "margin": result.margin, "abstain": result.abstain}
            row |= {probability_column(c): result.probabilities[c] for c in called}
        if record.label is not None:
            row["label"] = record.label
        if "split" in record.extra:
            row["split"] = record.extra["split"]
        rows.append(row)
    probabilities = [probability_column(c) for c in called]
    columns = ["slide_id", "call", *probabilities, "margin", "abstain", "best", "n_tiles", "status"]
    calls = pd.DataFrame(rows)
    calls = calls[columns + [c for c in ("label", "split") if c in calls.columns]]
    formats.write_calls(out_dir / "calls.tsv", calls)
    if "label" in calls.columns:
        _write_evaluation(calls, called, out_dir, settings)
    return calls


def _write_evaluation(calls: pd.DataFrame, called: Sequence[str], out_dir: Path, settings: CallSettings) -> None:
    other = sorted(set(calls["label"].dropna()) - set(called) - {""})
    if other:
        log.warning("labels %s are not classes of the prompt set %s: those slides are not evaluated", other, called)
    subset = evaluated_slides(calls, called)
    if subset.empty:
        log.warning("no labelled, non-training slides to evaluate")
        return
    predictions = [c if c else None for c in subset["call"]]
    probs = subset[[probability_column(c) for c in called]].to_numpy(dtype=np.float64)
    result = evaluate(
        subset["label"].tolist(), predictions, probs, list(called), n_bootstrap=settings.bootstrap, seed=settings.seed
    )
    result["slides"] = subset["slide_id"].tolist()
    result["settings"] = settings.__dict__
    if result.get("warning"):
        log.warning("%s", result["warning"])
    store.write_text_atomic(out_dir / "evaluation.json", json.dumps(result, indent=2, default=float) + "\n")
    confusion = pd.DataFrame(result["confusion"]).T.reindex(index=list(called), columns=list(called)).fillna(0)
    confusion.index.name = "true \\ called"
    store.write_text_atomic(out_dir / "confusion.tsv", confusion.astype(int).to_csv(sep="\t"))
