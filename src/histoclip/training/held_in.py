"""The held-in zero-shot check after training: do the class prompts pick the labels of pairs the model saw?

Held-in on purpose: it checks that the pipeline learnt its captions, not that the model generalises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from histoclip.embedding.models import LoadedModel
from histoclip.training.batches import TrainImages
from histoclip.zeroshot.classifier import class_weights

#: Pairs at most encoded for the held-in zero-shot check.
MAX_EVAL_PAIRS = 2048


@torch.inference_mode()
def encode_images(model: LoadedModel, images: torch.Tensor, bag: bool) -> torch.Tensor:
    """Normalised embeddings of uint8 NHWC images ([N, bag, S, S, 3] pooled per item when ``bag``)."""
    if not bag:
        return model.encode_tiles(images.to(model.device))
    n, k = images.shape[:2]
    tiles = model.encode_tiles(images.reshape(n * k, *images.shape[2:]).to(model.device))
    return F.normalize(tiles.view(n, k, -1).mean(1), dim=-1)


def _zero_shot(
    model: LoadedModel,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    labels: Sequence[str],
    prompts: Any,
    bag: bool,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy and per-class recall of the prompts' classifier on the given batches."""
    names, weights = class_weights(lambda texts: model.encode_texts(texts).cpu(), prompts, what="class prompts")
    classifier = torch.from_numpy(weights).float()
    predicted: list[int] = []
    for _, images in batches:
        scores = encode_images(model, images, bag) @ classifier.T.to(model.device)
        predicted.extend(scores.argmax(1).tolist())
    truth = np.array([names.index(label) for label in labels])
    guess = np.array(predicted)
    recall = {names[c]: float((guess[truth == c] == c).mean()) for c in np.unique(truth)}
    return {
        "held_in": True,
        "note": "zero-shot on pairs the model was trained on (held-in): checks the pipeline, not generalisation",
        "n": int(truth.size),
        "accuracy": float((guess == truth).mean()),
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "recall_per_class": recall,
        "classes": names,
    }


def held_in_check(
    loaded: LoadedModel,
    images: TrainImages,
    pairs: pd.DataFrame,
    class_prompts: Mapping[str, Sequence[str]],
    seed: int,
    logger: logging.Logger,
) -> dict[str, Any] | None:
    """Zero-shot accuracy of the class prompts on up to :data:`MAX_EVAL_PAIRS` training pairs whose label is
    a class (a seeded draw), for ``train.json``; None, with a warning, when no pair has such a label."""
    usable = [i for i, label in enumerate(pairs["label"].tolist()) if label in class_prompts]
    if not usable:
        logger.warning("no training pair has a label among the class prompts: no held-in zero-shot check")
        return None
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(usable, min(MAX_EVAL_PAIRS, len(usable)), replace=False).tolist())
    result = _zero_shot(loaded, images.pixels(chosen), pairs["label"].iloc[chosen].tolist(), class_prompts, images.bag)
    logger.info(
        "held-in zero-shot on %d training pairs: accuracy %.3f, balanced %.3f",
        result["n"],
        result["accuracy"],
        result["balanced_accuracy"],
    )
    return result
