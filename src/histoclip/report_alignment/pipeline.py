"""The report-alignment stage as the rules run it: embed reports, train the aligner, evaluate what it gives.

Three steps, one per rule, so that the text tower is loaded once (``encode``), training re-runs only when its
inputs or settings change (``train``), and figures and tables are redrawn without re-training (``evaluate``).
Held-out slides are those of the sheet not in the ``train`` split; training never reads them (their ids are
written into the aligner's provenance and checked again by ``evaluate``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip import formats, store
from histoclip.bags import BagReader
from histoclip.errors import InputError
from histoclip.plots import FigureStyle, new_figure, save_figure
from histoclip.report_alignment.reports import embed_reports, paired_slides, read_reports
from histoclip.report_alignment.retrieval import retrieval_metrics
from histoclip.report_alignment.training import AlignmentSettings, load_aligner, save_aligner, train_aligner
from histoclip.sheets import SlideRecord

log = logging.getLogger(__name__)

__all__ = ["encode", "evaluate", "held_out", "in_training", "train"]


def _is_train(record: SlideRecord) -> bool:
    return str(record.extra.get("split", "")).strip().lower() == "train"


def in_training(records: Sequence[SlideRecord], reports_path: str | Path) -> list[tuple[SlideRecord, str]]:
    """(slide, report id) of the train split's slides that have a report."""
    return [(r, rid) for r, rid in paired_slides(records, read_reports(reports_path)) if _is_train(r)]


def held_out(records: Sequence[SlideRecord], reports_path: str | Path) -> list[tuple[SlideRecord, str]]:
    """(slide, report id) of every other slide with a report, minus any whose report a training slide shares."""
    pairs = paired_slides(records, read_reports(reports_path))
    train_reports = {rid for r, rid in pairs if _is_train(r)}
    return [(r, rid) for r, rid in pairs if not _is_train(r) and rid not in train_reports]


def encode(
    model: Any,
    reports_path: str | Path,
    records: Sequence[SlideRecord],
    max_chunk_chars: int,
    out: str | Path,
) -> int:
    """Embed the reports of the sheet's slides (only those: a hospital-wide table may hold thousands more)."""
    table = read_reports(reports_path)
    wanted = {rid for _, rid in paired_slides(records, table)}
    if not wanted:
        raise InputError(
            f"no slide of the cohort sheet has a report (reports are keyed by {table.key})",
            where=str(reports_path),
            fix=f"the {table.key} values of the reports table must be those of the cohort sheet",
        )
    reports = {rid: text for rid, text in table.reports.items() if rid in wanted}
    ids, n_chunks, vectors = embed_reports(lambda t: model.encode_texts(t), reports, max_chunk_chars)
    meta = {"key": table.key, "reports_sha256": table.sha256, "max_chunk_chars": max_chunk_chars, **model.provenance()}
    formats.write_report_embeddings(out, ids, n_chunks, vectors, meta)
    return len(ids)


def _embedding_files(records: Sequence[SlideRecord], manifest: str | Path) -> dict[str, str]:
    paths = formats.embedding_paths(manifest)
    frame = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
    files = dict(zip(frame["slide_id"], paths, strict=True))
    return {r.slide_id: files[r.slide_id] for r in records}


#: Memory for bags kept after their first read (the aligner reads each training bag every epoch).
BAG_CACHE_MB = 1024.0


def _with_tiles(
    pairs: list[tuple[SlideRecord, str]], manifest: str | Path, what: str
) -> tuple[list[tuple[SlideRecord, str]], dict[str, str]]:
    """The pairs whose slide has embedded tiles (footers only), and their files; a slide that failed or has no
    tissue (``on_slide_error: record``) is left out and named in the log, not an error."""
    files = _embedding_files([r for r, _ in pairs], manifest)
    kept = []
    for record, rid in pairs:
        footer = formats.read_embedding_footer(files[record.slide_id])
        if footer.n_rows == 0:
            log.warning(
                "slide %s left out of %s: no embedded tiles (status %s)",
                record.slide_id,
                what,
                footer.metadata.get("status", "?"),
            )
        else:
            kept.append((record, rid))
    return kept, {r.slide_id: files[r.slide_id] for r, _ in kept}


def train(
    records: Sequence[SlideRecord],
    reports_path: str | Path,
    report_embeddings: str | Path,
    manifest: str | Path,
    settings: AlignmentSettings,
    out_weights: str | Path,
    out_history: str | Path,
    cache_mb: float = BAG_CACHE_MB,
) -> dict[str, Any]:
    """Train on the train split's slides with a report; write the weights (safetensors) and the history."""
    pairs, files = _with_tiles(in_training(records, reports_path), manifest, "training")
    ids, vectors, meta = formats.read_report_embeddings(report_embeddings)
    text = dict(zip(ids, vectors, strict=True))
    bags = BagReader(files, int(cache_mb * 2**20))
    result = train_aligner(
        bags,
        [r.slide_id for r, _ in pairs],
        [r.patient_id for r, _ in pairs],
        {r.slide_id: rid for r, rid in pairs},
        text,
        settings,
    )
    report_of = {r.slide_id: rid for r, rid in pairs}
    provenance = {
        "train_slides": result.train_slides,
        "validation_slides": result.validation_slides,
        "train_reports": sorted({report_of[s] for s in result.train_slides}),
        "validation_reports": sorted({report_of[s] for s in result.validation_slides}),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history) - 1,
        "settings": settings.__dict__,
        "embedding_weights_sha256": bags.weights_sha256,
        "reports_sha256": meta.get("reports_sha256"),
        "text_weights_sha256": meta.get("weights_sha256"),
    }
    save_aligner(out_weights, result.model, provenance)
    store.write_text_atomic(out_history, pd.DataFrame(result.history).to_csv(sep="\t", index=False))
    log.info(
        "aligner trained on %d slides (%d for early stopping) in %.1f s; best epoch %d of %d",
        len(result.train_slides),
        len(result.validation_slides),
        result.seconds,
        result.best_epoch,
        len(result.history) - 1,
    )
    return provenance


def _slide_vectors(model: Any, bags: BagReader, slides: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    import torch

    vectors, attentions = [], []
    with torch.no_grad():
        for slide in slides:
            vector, attention = model.slide(torch.from_numpy(np.ascontiguousarray(bags(slide)[2])))
            vectors.append(vector.numpy())
            attentions.append(attention.numpy())
    return np.stack(vectors).astype(np.float64), attentions


def _untrained(dim: int) -> Any:
    from histoclip.report_alignment.model import SlideReportAligner

    return SlideReportAligner(dim, 1).eval()


def evaluate(
    records: Sequence[SlideRecord],
    reports_path: str | Path,
    report_embeddings: str | Path,
    manifest: str | Path,
    weights: str | Path,
    report_classifier: str | Path,
    tile_calls: str | Path,
    *,
    ks: Sequence[int],
    abstain_margin: float,
    bootstrap: int,
    seed: int,
    out_dir: str | Path,
    figure_stem: str | Path,
    style: FigureStyle,
    attention_slides: int,
    top_n: int,
    tiles: dict[str, str],
    thumbnails: dict[str, str],
    slide_files: dict[str, str],
) -> dict[str, Any]:
    """retrieval.json, calls.tsv, evaluation.json, comparison.tsv, attention maps and the retrieval figure."""
    import torch

    from histoclip.report_alignment.attention import attention_map
    from histoclip.report_alignment.calls import compare_with_tile_zeroshot, report_style_calls

    out_dir = Path(out_dir)
    model, provenance = load_aligner(weights)
    pairs, files = _with_tiles(held_out(records, reports_path), manifest, "evaluation")
    seen = set(provenance["train_slides"]) | set(provenance["validation_slides"])
    seen_reports = set(provenance["train_reports"]) | set(provenance["validation_reports"])
    leaked = [r.slide_id for r, rid in pairs if r.slide_id in seen or rid in seen_reports]
    if leaked:
        raise InputError(
            f"held-out slides {leaked[:5]} (or their reports) were used to train the aligner",
            where=str(weights),
            fix="re-train: the sheet's split column changed since the aligner was trained",
        )
    if len(pairs) < 2:
        raise InputError(
            f"{len(pairs)} held-out slide(s) with a report: retrieval needs at least 2",
            where=str(reports_path),
            fix="give reports for slides outside the train split",
        )
    slides = [r.slide_id for r, _ in pairs]
    slide_reports = [rid for _, rid in pairs]
    report_ids = list(dict.fromkeys(slide_reports))
    ids, vectors, _ = formats.read_report_embeddings(report_embeddings)
    text = dict(zip(ids, vectors, strict=True))
    bags = BagReader(files, int(BAG_CACHE_MB * 2**20))
    text_matrix = torch.from_numpy(np.stack([text[r] for r in report_ids]).astype(np.float32))
    results: dict[str, Any] = {}
    for name, aligner in (("aligned", model), ("untrained", _untrained(model.dim))):
        slide_vectors, attentions = _slide_vectors(aligner, bags, slides)
        with torch.no_grad():
            report_vectors = aligner.text(text_matrix).numpy().astype(np.float64)
        results[name] = retrieval_metrics(report_vectors @ slide_vectors.T, report_ids, slide_reports, ks)
        if name == "aligned":
            aligned_slides, aligned_attention = slide_vectors, attentions
    summary = {
        "held_out_slides": slides,
        "held_out_reports": report_ids,
        "train_slides": provenance["train_slides"],
        "validation_slides": provenance["validation_slides"],
        "best_epoch": provenance["best_epoch"],
        **results,
    }
    store.write_text_atomic(out_dir / "retrieval.json", json.dumps(summary, indent=2) + "\n")
    _retrieval_figure(results, figure_stem, style)

    classifier = formats.read_text_classifier(report_classifier)
    with torch.no_grad():
        class_vectors = model.text(torch.from_numpy(classifier.weights.astype(np.float32))).numpy()
    info = pd.DataFrame(
        {
            "slide_id": slides,
            "n_tiles": [len(a) for a in aligned_attention],
            **({"label": [r.label or "" for r, _ in pairs]} if any(r.label for r, _ in pairs) else {}),
            "split": [r.extra.get("split", "") for r, _ in pairs],
        }
    )
    calls = report_style_calls(
        slides, aligned_slides, class_vectors, classifier, float(model.logit_scale.detach()), abstain_margin, info
    )
    formats.write_calls(out_dir / "calls.tsv", calls)
    called = classifier.called_classes
    comparison = pd.DataFrame()
    if "label" in calls.columns and calls["label"].isin(called).any():
        evaluation, comparison = compare_with_tile_zeroshot(
            calls, formats.read_calls(tile_calls), called, bootstrap, seed
        )
        store.write_text_atomic(out_dir / "evaluation.json", json.dumps(evaluation, indent=2, default=float) + "\n")
    store.write_text_atomic(out_dir / "comparison.tsv", comparison.to_csv(sep="\t", index=False, float_format="%.6g"))

    calls_by_slide = calls.set_index("slide_id").to_dict("index")
    for slide, attention in list(zip(slides, aligned_attention, strict=True))[:attention_slides]:
        x, y, _ = bags(slide)
        attention_map(
            slide_files[slide],
            tiles[slide],
            thumbnails[slide],
            out_dir / "attention" / slide,
            x,
            y,
            attention.astype(np.float64),
            top_n=top_n,
            style=style,
            call={"slide_id": slide, **calls_by_slide[slide]},
        )
    return summary


def _retrieval_figure(results: dict[str, Any], stem: str | Path, style: FigureStyle) -> None:
    """Recall@k against k, both directions, aligned and untrained (the CLIP space itself), with chance."""
    rows = []
    for model_name, result in results.items():
        for direction, metrics in (
            ("report → slide", result["report_to_slide"]),
            ("slide → report", result["slide_to_report"]),
        ):
            ranks = np.asarray(metrics["ranks"])
            n = metrics["n_candidates"]
            for k in range(1, n + 1):
                rows.append({"model": model_name, "direction": direction, "k": k, "recall": float(np.mean(ranks <= k))})
                if model_name == "aligned":
                    rows.append({"model": "chance", "direction": direction, "k": k, "recall": min(1.0, k / n)})
    data = pd.DataFrame(rows)
    figure = new_figure(style)
    with style.context():
        axes = figure.subplots(1, 2, sharey=True)
        for ax, direction in zip(axes, ("report → slide", "slide → report"), strict=True):
            part = data[data["direction"] == direction]
            for model_name, line in (("aligned", "-"), ("untrained", "--"), ("chance", ":")):
                curve = part[part["model"] == model_name]
                ax.plot(curve["k"], curve["recall"], line, label=model_name)
            ax.set_title(f"{direction} (held-out slides)")
            ax.set_xlabel("k")
        axes[0].set_ylabel("recall@k")
        axes[0].legend(frameon=False)
    save_figure(figure, stem, style, data=data, title="slide–report retrieval")
