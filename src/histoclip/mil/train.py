"""Training one MIL model: bag by bag, class-weighted cross-entropy, early stopping on held-back patients.

One bag per step (bags differ in size, and a mean over bags of different slides would weigh large slides more),
AdamW, classes weighted by the inverse of their frequency in the training fold (balanced accuracy is the
headline metric, so a minority class must not be ignored). Each epoch visits the training bags in a seeded
random order, each bag cut to ``max_train_tiles`` random tiles (a regulariser, and a bound on a step's time); the
validation loss is computed on every tile of the held-back patients' slides, and the weights of the epoch with
the lowest validation loss are kept. Nothing of the test fold is seen here.

Deterministic on the CPU: weights, dropout, order and tile draws all come from seeds, and torch's deterministic
algorithms are switched on (a GPU run is close to, not bit-identical with, a CPU run).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from histoclip.bags import Bag, BagReader
from histoclip.embedding.models import resolve_device as resolve_model_device
from histoclip.mil.models import build_model
from histoclip.mil.settings import MilSettings

__all__ = ["FoldFit", "predict", "resolve_device", "train_model"]

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """The device of ``mil.device`` (:func:`histoclip.embedding.models.resolve_device`, naming this key)."""
    return resolve_model_device(device, "mil.device")


@dataclass
class FoldFit:
    """A trained model's weights (the best epoch's), and how training went."""

    state: dict[str, torch.Tensor]
    best_epoch: int
    epochs_run: int
    best_validation_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


def _class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _bag_tensor(bag: Bag, device: torch.device, rows: np.ndarray | None = None) -> torch.Tensor:
    features = bag.features if rows is None else bag.features[rows]
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)


def _validation_loss(
    model: torch.nn.Module, bags: BagReader, ids: Sequence[str], labels: Sequence[int], loss_fn: Any, device: Any
) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for bag, label in zip(bags.iterate(list(ids)), labels, strict=True):
            logits, _ = model(_bag_tensor(bag, device))
            total += float(loss_fn(logits[None], torch.tensor([label], device=device)))
    return total / max(len(ids), 1)


def train_model(
    model_name: str,
    dim: int,
    n_classes: int,
    train: tuple[Sequence[str], Sequence[int]],
    validation: tuple[Sequence[str], Sequence[int]],
    bags: BagReader,
    settings: MilSettings,
    device: torch.device,
    seed: Sequence[int],
) -> FoldFit:
    """Train ``model_name`` on the ``train`` (slide ids, class indices) bags, stopping early on ``validation``
    (without validation slides: ``max_epochs`` epochs, the last kept). ``seed`` (a list of ints) seeds the
    weights, dropout, the order of the bags and the tiles drawn."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    rng = np.random.default_rng(list(seed))
    model = build_model(model_name, dim, n_classes, settings.hidden_dim, settings.dropout).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    train_ids, train_labels = list(train[0]), list(train[1])
    val_ids, val_labels = list(validation[0]), list(validation[1])
    # the validation loss uses the same class weights: it measures the balanced objective training optimises
    loss_fn = torch.nn.CrossEntropyLoss(weight=_class_weights(train_labels, n_classes).to(device))
    best = FoldFit(copy.deepcopy(model.state_dict()), 0, 0, math.inf)
    stale = 0
    for epoch in range(1, settings.max_epochs + 1):
        model.train()
        order = rng.permutation(len(train_ids))
        running = 0.0
        for bag, i in zip(bags.iterate([train_ids[i] for i in order]), order, strict=True):
            rows = None
            if settings.max_train_tiles is not None and bag.n_tiles > settings.max_train_tiles:
                rows = np.sort(rng.choice(bag.n_tiles, settings.max_train_tiles, replace=False))
            logits, _ = model(_bag_tensor(bag, device, rows))
            loss = loss_fn(logits[None], torch.tensor([train_labels[i]], device=device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            running += float(loss.detach())
        train_loss = running / max(len(train_ids), 1)
        val_loss = _validation_loss(model, bags, val_ids, val_labels, loss_fn, device) if val_ids else train_loss
        best.history.append({"epoch": epoch, "train_loss": train_loss, "validation_loss": val_loss})
        best.epochs_run = epoch
        if val_loss < best.best_validation_loss - 1e-6 or not val_ids:
            best.state = copy.deepcopy(model.state_dict())
            best.best_epoch, best.best_validation_loss, stale = epoch, val_loss, 0
        else:
            stale += 1
            if stale >= settings.patience:
                break
    best.state = {k: v.detach().cpu() for k, v in best.state.items()}
    return best


def predict(
    models: Sequence[torch.nn.Module], bags: BagReader, slide_ids: Sequence[str], device: torch.device
) -> Iterator[tuple[Bag, np.ndarray, np.ndarray]]:
    """(bag, class probabilities [C], tile attention [N]) per slide, on all its tiles: the mean over ``models``
    (one fold's model, or a deployed ensemble) of their softmax outputs and attention weights."""
    for model in models:
        model.eval()
    with torch.no_grad():
        for bag in bags.iterate(list(slide_ids)):
            tensor = _bag_tensor(bag, device)
            probs, attention = [], []
            for model in models:
                logits, weights = model(tensor)
                probs.append(torch.softmax(logits, dim=-1).cpu().numpy().astype(np.float64))
                attention.append(weights.cpu().numpy().astype(np.float64))
            yield bag, np.mean(probs, axis=0), np.mean(attention, axis=0)
