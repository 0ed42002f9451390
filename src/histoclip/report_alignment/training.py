"""Training the slide–report aligner: seeded, on the sheet's train split, early stopping on a validation part.

Which slides: those of the cohort sheet's ``train`` split that have a report; a seeded share of their
*patients* (``validation_fraction``) is set aside for early stopping, so no patient is on both sides. Slides of
the other splits are never read here: they are the held-out slides of retrieval and calls. The loss is CLIP's
symmetric contrastive loss over a batch of (slide, report) pairs; when reports are per patient, a patient's
slides share one report and each of them counts as a match (soft targets), rather than as a negative.

Determinism: the torch and numpy seeds come from the workflow seed, deterministic algorithms are on, and
the thread count is fixed by the caller, so two CPU runs give the same weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoclip.config import SectionSettings
from histoclip.errors import InputError
from histoclip.report_alignment.bags import sample_tiles
from histoclip.report_alignment.model import SlideReportAligner

__all__ = [
    "AlignmentSettings",
    "TrainingResult",
    "contrastive_loss",
    "load_aligner",
    "save_aligner",
    "split_validation",
    "train_aligner",
]

log = logging.getLogger(__name__)

Bags = Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class AlignmentSettings(SectionSettings, section="report_alignment.training"):
    """Config ``report_alignment.training`` and the workflow seed."""

    epochs: int
    patience: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    max_tiles: int
    attention_hidden: int
    validation_fraction: float
    seed: int


@dataclass
class TrainingResult:
    model: SlideReportAligner
    train_slides: list[str]
    validation_slides: list[str]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


#: Fewest training patients with a report: 2 to fit on, 1 to stop on (rules/common.smk's planner says the same).
MIN_PATIENTS = 3


def split_validation(
    slides: Sequence[str], patients: Sequence[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(fit slides, validation slides): a seeded ``fraction`` of the patients (at least one, and at least one
    left to fit on), all of a patient's slides on the same side; both lists keep the given order."""
    unique = sorted(set(patients))
    if len(unique) < MIN_PATIENTS:
        raise InputError(
            f"only {len(unique)} patient(s) of the train split have a report; alignment needs at least {MIN_PATIENTS} "
            "(2 to fit on, 1 to stop on)",
            where="report_alignment",
            fix="add reports for more training slides, or mark more slides split = train in the sheet",
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 18, 1]))
    n_val = min(max(1, int(round(fraction * len(unique)))), len(unique) - 2)
    held = set(rng.permutation(unique)[:n_val].tolist())
    fit = [s for s, p in zip(slides, patients, strict=True) if p not in held]
    val = [s for s, p in zip(slides, patients, strict=True) if p in held]
    return fit, val


def contrastive_loss(
    slide_vectors: torch.Tensor, text_vectors: torch.Tensor, report_ids: Sequence[str], scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch; pairs sharing a report id are all positives (soft targets)."""
    logits = scale * slide_vectors @ text_vectors.T
    codes = {rid: i for i, rid in enumerate(dict.fromkeys(report_ids))}
    ids = torch.tensor([codes[r] for r in report_ids])
    same = (ids[:, None] == ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    image_to_text = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_to_image = -(targets.T * torch.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def _slide_vectors(
    model: SlideReportAligner, bags: Bags, slides: Sequence[str], rng: np.random.Generator | None, max_tiles: int
) -> torch.Tensor:
    vectors = []
    for slide in slides:
        embeddings = bags(slide)[2]
        if rng is not None:
            embeddings = embeddings[sample_tiles(len(embeddings), max_tiles, rng)]
        vectors.append(model.slide(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)))[0])
    return torch.stack(vectors)


def train_aligner(
    bags: Bags,
    slides: Sequence[str],
    patients: Sequence[str],
    report_of: dict[str, str],
    report_embeddings: dict[str, np.ndarray],
    settings: AlignmentSettings,
) -> TrainingResult:
    """Fit the aligner on ``slides`` (the train split's slides with a report; ``patients`` theirs) and return
    the weights of the epoch with the lowest validation loss."""
    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True)
    fit, val = split_validation(slides, patients, settings.validation_fraction, settings.seed)
    dim = next(iter(report_embeddings.values())).shape[0]
    model = SlideReportAligner(dim, settings.attention_hidden)
    text = {rid: torch.from_numpy(np.asarray(v, dtype=np.float32)) for rid, v in report_embeddings.items()}
    with torch.no_grad():
        means = torch.stack([torch.from_numpy(np.ascontiguousarray(bags(s)[2], dtype=np.float32)).mean(0) for s in fit])
        model.centre(means, torch.stack([text[r] for r in dict.fromkeys(report_of[s] for s in fit)]))
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 18, 2]))
    start = time.perf_counter()

    def loss_on(names: Sequence[str], draw: np.random.Generator | None) -> torch.Tensor:
        rids = [report_of[s] for s in names]
        slide_vectors = _slide_vectors(model, bags, names, draw, settings.max_tiles)
        text_vectors = model.text(torch.stack([text[r] for r in rids]))
        return contrastive_loss(slide_vectors, text_vectors, rids, model.logit_scale)

    with torch.no_grad():
        best = float(loss_on(val, None)) if len({report_of[s] for s in val}) > 1 else math.inf
    history = [{"epoch": 0, "train_loss": math.nan, "validation_loss": best}]
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    best_epoch, since_best = 0, 0
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = rng.permutation(len(fit))
        losses = []
        for begin in range(0, len(order), settings.batch_size):
            batch = [fit[i] for i in order[begin : begin + settings.batch_size]]
            if len({report_of[s] for s in batch}) < 2:
                continue  # a batch of one report has no negatives
            loss = loss_on(batch, rng)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            val_loss = float(loss_on(val, None)) if len({report_of[s] for s in val}) > 1 else float(np.mean(losses))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "validation_loss": val_loss})
        if val_loss < best - 1e-6:
            best, best_epoch, since_best = val_loss, epoch, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= settings.patience:
                log.info("early stop at epoch %d: validation loss best at epoch %d (%.4f)", epoch, best_epoch, best)
                break
    model.load_state_dict(best_state)
    model.eval()
    return TrainingResult(model, list(fit), list(val), best_epoch, history, time.perf_counter() - start)


def save_aligner(path: str | Path, model: SlideReportAligner, provenance: dict[str, Any]) -> None:
    """Weights as safetensors (no pickle: safe to load), the architecture and provenance in its metadata."""
    import json

    from safetensors.torch import save_file

    from histoclip.store import atomic_path

    # one metadata key: safetensors writes its metadata map in no fixed order, and one key keeps files of the
    # same weights byte-identical
    meta = {
        "histoclip": json.dumps(
            {"dim": model.dim, "attention_hidden": model.attention_v.out_features, "provenance": provenance},
            sort_keys=True,
            default=str,
        )
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_aligner(path: str | Path) -> tuple[SlideReportAligner, dict[str, Any]]:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["histoclip"])
    model = SlideReportAligner(int(meta["dim"]), int(meta["attention_hidden"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    model.eval()
    return model, meta["provenance"]
