"""Zero-shot slide classification from text prompts (CONCH / MI-Zero recipe), in numpy.

The recipe, and why each step is there:

1. **Text classifier** — per class, every synonym × template prompt is embedded, each embedding is
   L2-normalised (open_clip's ``encode_text`` does not normalise), the normalised embeddings are averaged and
   the mean is renormalised. Averaging over many wordings is a prompt ensemble: it damps the large
   sensitivity of CLIP models to any one phrasing. Rows follow ``PromptSet.all_classes`` (called, then
   background).
2. **Tile scores** — cosine similarity between each tile's *projected* image embedding and each class row.
   Embeddings are renormalised here because they are stored as float16, whose rounding leaves norms a
   little off 1.
3. **Pooling** — a slide score per class from its tile scores. The default, top-K mean, takes each class's
   own K best tiles: a subtype is decided by where it is present, not diluted by stroma and fat. K is fixed
   in advance (config), never tuned on test labels.
4. **Probabilities** — ``softmax(logit_scale × slide scores)`` over the *called* classes only. Background
   classes are scored (heatmaps) but are not answers for a slide, so they take no probability mass.
5. **Call** — the most probable called class, or an abstention when the top two are too close to call.

``logit_scale`` everywhere means the *already exponentiated* scale: open_clip's
``model.logit_scale.exp()`` (``LoadedModel.logit_scale``), about 100 for trained CLIP models — not the raw
learnable parameter ``model.logit_scale`` (≈ 4.6 = log 100), which would flatten probabilities ~20-fold.

All arithmetic is float64; float16/float32 inputs are accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from histoclip.zeroshot.prompts import PromptSet

__all__ = [
    "POOLING_METHODS",
    "SlideCall",
    "call_slide",
    "class_weights",
    "pool",
    "probabilities",
    "text_classifier",
    "tile_scores",
]

POOLING_METHODS = ("topk", "mean", "lse")


def _as_float64(array: Any) -> np.ndarray:
    """numpy float64 from a numpy array or a torch tensor (on any device) without importing torch."""
    if hasattr(array, "detach"):
        array = array.detach().cpu()
        if str(array.dtype) in ("torch.bfloat16",):
            array = array.float()
        array = array.numpy()
    return np.asarray(array, dtype=np.float64)


def _normalise_rows(matrix: np.ndarray, what: str) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    bad = ~np.isfinite(norms[..., 0]) | (norms[..., 0] == 0)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(f"{what}: {int(bad.sum())} row(s) have zero or non-finite norm (first: {rows})")
    return matrix / norms


def class_weights(
    encode_texts: Callable[[list[str]], Any],
    class_prompts: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 256,
    what: str = "prompts",
) -> tuple[list[str], np.ndarray]:
    """Class names and unit-norm weights ``[C, D]`` (float64): per class, the mean of its prompts' L2-normalised
    text embeddings, renormalised (CONCH / MI-Zero). The one implementation of the text classifier, used by
    the zero-shot rules and by training's held-in check.

    ``encode_texts`` maps a list of strings to an ``[n, D]`` array or tensor, normalised or not (each prompt
    embedding is normalised here before averaging, so both give the same weights). Prompts of all classes
    are encoded together in batches of ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    classes = list(class_prompts)
    per_class = [list(class_prompts[cls]) for cls in classes]
    for cls, prompts in zip(classes, per_class, strict=True):
        if not prompts:
            raise ValueError(f"{what}: class {cls!r} has no prompts")
    texts = [text for prompts in per_class for text in prompts]
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        encoded = _as_float64(encode_texts(batch))
        if encoded.ndim != 2 or encoded.shape[0] != len(batch):
            raise ValueError(
                f"encode_texts returned shape {encoded.shape} for {len(batch)} texts; expected [{len(batch)}, D]"
            )
        chunks.append(encoded)
    embeddings = _normalise_rows(np.concatenate(chunks), f"text embeddings of {what}")
    weights = np.empty((len(classes), embeddings.shape[1]), dtype=np.float64)
    start = 0
    for row, prompts in enumerate(per_class):
        weights[row] = embeddings[start : start + len(prompts)].mean(axis=0)
        start += len(prompts)
    return classes, _normalise_rows(weights, f"class weights of {what}")


def text_classifier(
    encode_texts: Callable[[list[str]], Any], prompt_set: PromptSet, batch_size: int = 256
) -> tuple[list[str], np.ndarray]:
    """Class names (``prompt_set.all_classes`` order) and unit-norm classifier weights ``[C, D]`` (float64)."""
    class_prompts = {cls: prompt_set.prompts(cls) for cls in prompt_set.all_classes}
    return class_weights(encode_texts, class_prompts, batch_size=batch_size, what=f"prompt set {prompt_set.name!r}")


def tile_scores(embeddings: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Cosine similarity ``[N, C]`` of tile embeddings ``[N, D]`` with classifier rows ``[C, D]``."""
    embeddings = _as_float64(embeddings)
    weights = _as_float64(weights)
    if embeddings.ndim != 2 or weights.ndim != 2:
        raise ValueError(f"embeddings and weights must be 2-D, got {embeddings.shape} and {weights.shape}")
    if embeddings.shape[1] != weights.shape[1]:
        raise ValueError(
            f"tile embeddings have dimension {embeddings.shape[1]} but the text classifier {weights.shape[1]}: "
            "the embeddings were made by another model, or are pre-projection features (zero-shot needs the "
            "projected image embeddings, in the same space as the text embeddings)"
        )
    if embeddings.shape[0] == 0:
        return np.zeros((0, weights.shape[0]), dtype=np.float64)
    return _normalise_rows(embeddings, "tile embeddings") @ _normalise_rows(weights, "classifier weights").T


def pool(scores: np.ndarray, method: str = "topk", k: int = 50, temperature: float = 1.0) -> np.ndarray:
    """Slide score per class ``[C]`` from tile scores ``[N, C]``.

    - ``topk``: mean of that class's own top ``min(k, N)`` tile scores (each class picks its own tiles);
    - ``mean``: mean over all tiles;
    - ``lse``: ``log(mean(exp(temperature × s))) / temperature``, a smooth maximum that goes from the mean
      (temperature → 0) to the maximum (temperature → ∞); computed stably by shifting by the maximum.
    """
    scores = _as_float64(scores)
    if scores.ndim != 2:
        raise ValueError(f"tile scores must be [tiles, classes], got shape {scores.shape}")
    if scores.shape[0] == 0:
        raise ValueError(
            "cannot pool a slide with no tiles (0 rows of tile scores): the slide has no tissue tiles; "
            "check its tiling/QC output or drop it from the cohort"
        )
    if method == "topk":
        if k < 1:
            raise ValueError(f"top-K pooling needs k >= 1, got {k}")
        n = scores.shape[0]
        kk = min(int(k), n)
        top = np.partition(scores, n - kk, axis=0)[n - kk :]
        return top.mean(axis=0)
    if method == "mean":
        return scores.mean(axis=0)
    if method == "lse":
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"LSE pooling needs a positive finite temperature, got {temperature}")
        scaled = temperature * scores
        peak = scaled.max(axis=0)
        return (peak + np.log(np.mean(np.exp(scaled - peak), axis=0))) / temperature
    raise ValueError(f"unknown pooling method {method!r}; choose one of {POOLING_METHODS}")


def probabilities(slide_scores: np.ndarray, logit_scale: float) -> np.ndarray:
    """``softmax(logit_scale × scores)`` over the last axis; pass only the called classes' columns.

    ``logit_scale`` is the exponentiated CLIP temperature (``model.logit_scale.exp()``, ~100), see the module
    docstring. The maximum is subtracted before exponentiating, so large scales do not overflow.
    """
    if not (logit_scale > 0 and math.isfinite(logit_scale)):
        raise ValueError(f"logit_scale must be positive and finite (the exponentiated scale, ~100), got {logit_scale}")
    logits = logit_scale * _as_float64(slide_scores)
    if logits.shape[-1] == 0:
        raise ValueError("no classes to take probabilities over")
    logits = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=-1, keepdims=True)


@dataclass
class SlideCall:
    """The zero-shot answer for one slide.

    ``call`` is the answer to report (``None`` when abstaining); ``best`` is the most probable class whether
    or not the call abstained, so a study can also be scored without abstention. Ties in probability go to
    the class listed first in the prompt set.
    """

    call: str | None
    best: str
    probabilities: dict[str, float] = field(default_factory=dict)
    margin: float = 0.0
    abstain: bool = False


def call_slide(
    slide_scores_called: np.ndarray, classes: Sequence[str], logit_scale: float, abstain_margin: float
) -> SlideCall:
    """Call one slide from its pooled scores over the called classes.

    ``margin = p(best) − p(second best)``; the slide is an abstention (``call=None``) when
    ``margin < abstain_margin``, so ``abstain_margin=0`` never abstains (even on an exact tie, which then goes
    to the first-listed class).
    """
    scores = _as_float64(slide_scores_called)
    classes = list(classes)
    if scores.ndim != 1 or scores.shape[0] != len(classes):
        raise ValueError(f"expected {len(classes)} slide scores (one per called class), got shape {scores.shape}")
    if len(classes) < 2:
        raise ValueError(f"a slide call needs at least 2 called classes, got {classes}")
    if not 0.0 <= abstain_margin <= 1.0:
        raise ValueError(f"abstain_margin is a probability difference in [0, 1], got {abstain_margin}")
    probs = probabilities(scores, logit_scale)
    order = np.argsort(-probs, kind="stable")  # stable: ties keep class order
    best = classes[int(order[0])]
    margin = float(probs[order[0]] - probs[order[1]])
    abstain = margin < abstain_margin
    return SlideCall(
        call=None if abstain else best,
        best=best,
        probabilities={cls: float(p) for cls, p in zip(classes, probs, strict=True)},
        margin=margin,
        abstain=bool(abstain),
    )
