"""The reports table: which report belongs to which slide, how a report is cut into chunks, and its embedding.

A table (TSV or CSV) with a ``report`` column and a key column, ``slide_id`` (one report per slide) or
``patient_id`` (one report for all of a patient's slides). Reports are split into sentences (over-long ones
cut at ``max_chunk_chars``), because CLIP text towers read a short context (77 tokens, the demo's 32): a
whole report would be cut off after its first sentences. Each chunk is embedded by the model's own text
tower, L2-normalised, and a report's chunks are averaged and renormalised (the prompt-ensemble rule of
zero-shot, applied to a report's sentences).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip.errors import InputError
from histoclip.sheets import SlideRecord

__all__ = ["KEY_COLUMNS", "ReportTable", "embed_reports", "read_reports", "split_report"]

KEY_COLUMNS = ("slide_id", "patient_id")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")


@dataclass(frozen=True)
class ReportTable:
    """Reports keyed by slide or patient; ``key`` says which."""

    key: str
    reports: dict[str, str]
    sha256: str
    path: str

    def report_id(self, record: SlideRecord) -> str | None:
        """The report of a slide: its own (key slide_id) or its patient's (key patient_id); None without one."""
        rid = record.slide_id if self.key == "slide_id" else record.patient_id
        return rid if rid in self.reports else None


def read_reports(path: str | Path) -> ReportTable:
    """Read and check a reports table; every problem names the file and the row."""
    path = Path(path)
    if not path.exists():
        raise InputError(
            "the reports table does not exist", where=str(path), fix="set report_alignment.reports to the right path"
        )
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    keys = [c for c in KEY_COLUMNS if c in frame.columns]
    if "report" not in frame.columns or not keys:
        raise InputError(
            f"the reports table needs a `report` column and a `slide_id` or `patient_id` column; it has "
            f"{list(frame.columns)}",
            where=str(path),
            fix="name the columns slide_id (or patient_id) and report",
        )
    key = keys[0]
    for line, (rid, text) in enumerate(zip(frame[key], frame["report"], strict=True), start=2):
        if not rid.strip():
            raise InputError(f"line {line}: empty {key}", where=str(path), fix=f"fill in the {key} of every report")
        if not text.strip():
            raise InputError(
                f"line {line} ({key} {rid!r}): empty report", where=str(path), fix="drop the row or fill in its report"
            )
    duplicated = sorted(set(frame.loc[frame[key].duplicated(), key]))
    if duplicated:
        raise InputError(
            f"{key} listed more than once: {', '.join(duplicated[:5])}",
            where=str(path),
            fix=f"one report per {key}: join a {key}'s reports into one text",
        )
    reports = dict(zip(frame[key].str.strip(), frame["report"], strict=True))
    return ReportTable(key, reports, hashlib.sha256(path.read_bytes()).hexdigest(), str(path))


def split_report(text: str, max_chunk_chars: int) -> list[str]:
    """Sentences of ``text`` (split after . ! ? ; and at line breaks), one chunk each; a sentence longer than
    ``max_chunk_chars`` is cut at word boundaries. Sentences are not merged: a CLIP text tower summarises a
    chunk by its dominant finding, so two findings in one chunk would lose one."""
    if max_chunk_chars < 1:
        raise ValueError(f"max_chunk_chars must be at least 1, got {max_chunk_chars}")
    chunks: list[str] = []
    for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
        while len(sentence) > max_chunk_chars:
            cut = sentence.rfind(" ", 0, max_chunk_chars + 1)
            cut = cut if cut > 0 else max_chunk_chars
            chunks.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            chunks.append(sentence)
    return chunks


def embed_reports(
    encode_texts: Callable[[list[str]], Any], reports: dict[str, str], max_chunk_chars: int, batch_size: int = 256
) -> tuple[list[str], list[int], np.ndarray]:
    """(report ids, chunks per report, pooled unit-norm embeddings [R, D] float64): each report's chunks are
    encoded (in batches across reports), normalised, averaged and renormalised."""
    ids = list(reports)
    chunks = [split_report(reports[rid], max_chunk_chars) for rid in ids]
    texts = [c for cs in chunks for c in cs]
    encoded = []
    for start in range(0, len(texts), batch_size):
        out = encode_texts(texts[start : start + batch_size])
        if hasattr(out, "detach"):
            out = out.detach().float().cpu().numpy()
        encoded.append(np.asarray(out, dtype=np.float64))
    vectors = _unit(np.concatenate(encoded) if encoded else np.zeros((0, 1)))
    pooled = []
    start = 0
    for cs in chunks:
        pooled.append(vectors[start : start + len(cs)].mean(axis=0))
        start += len(cs)
    return ids, [len(cs) for cs in chunks], _unit(np.stack(pooled))


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("a text embedding has zero or non-finite norm")
    return matrix / norms


def paired_slides(records: Sequence[SlideRecord], table: ReportTable) -> list[tuple[SlideRecord, str]]:
    """(slide, report id) for every slide of the sheet that has a report, in sheet order."""
    pairs = []
    for record in records:
        rid = table.report_id(record)
        if rid is not None:
            pairs.append((record, rid))
    return pairs
