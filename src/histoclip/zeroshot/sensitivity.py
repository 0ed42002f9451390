"""Prompt sensitivity of zero-shot calls: balanced accuracy over random sub-prompt-sets, the full set marked.

Why: zero-shot accuracy moves by tens of points with the wording of the prompts (MI-Zero: 0.41–0.92 balanced
accuracy across prompt sets on one task), so one number from one prompt set overstates what is known. This
re-runs the whole zero-shot evaluation — text classifier, tile scores, top-K pooling, calls, balanced
accuracy on the held-out labelled slides — for many random subsets of the templates and synonyms
(:meth:`PromptSet.subset`, drawn by :func:`histoclip.zeroshot.evaluation.prompt_sensitivity`), and reports the spread.

Cost, and why the loops are the way round they are:

- **Text.** A subset's classifier is a per-class average of normalised prompt embeddings, and every subset's
  prompts are prompts of the full set. So each distinct prompt string is encoded once (one model load, one
  pass over the prompts) and every subset's classifier is an average of cached rows: no model call per
  subset.
- **Tiles.** The slide loop is outside and the subset loop inside: each held-out slide's tile embeddings are
  read once, scored against the classifiers of *all* subsets at once (one matrix product), and pooled per
  subset, after which only ``[subsets, classes]`` pooled scores per slide are kept. Memory is one slide's
  tiles plus a few numbers per slide and subset, whatever the size of the cohort; nothing is approximated
  (keeping only each slide's top tiles would not be exact, because another subset's classifier ranks the
  tiles differently). Subsets are processed in blocks so that a slide's score matrix stays bounded
  (:data:`MAX_SCORE_VALUES`).

The full prompt set goes through the same code path, so its balanced accuracy must equal the zero-shot rule's
``evaluation.json`` (the rule records both to make that checkable).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip.config import SectionSettings, default_config
from histoclip.zeroshot.classifier import call_slide, class_weights, pool, tile_scores
from histoclip.zeroshot.evaluation import evaluate, prompt_sensitivity
from histoclip.zeroshot.prompts import PromptSet

__all__ = [
    "MAX_SCORE_VALUES",
    "PromptCache",
    "SensitivitySettings",
    "cohort_prompt_sensitivity",
    "plot_prompt_sensitivity",
    "pooled_scores",
    "read_prompt_sensitivity",
    "run_prompt_sensitivity",
    "write_prompt_sensitivity",
]

log = logging.getLogger(__name__)

#: Upper bound on tiles × (subsets × classes) float64 values scored at once for one slide (~128 MiB).
MAX_SCORE_VALUES = 1 << 24


@dataclass(frozen=True)
class SensitivitySettings(SectionSettings, section="zeroshot"):
    """Zero-shot settings (as the zeroshot rule uses them) plus the subset draws (config ``zeroshot``)."""

    pooling: str
    top_k: int
    lse_temperature: float
    abstain_margin: float
    n_subsets: int
    template_fraction: float
    synonym_fraction: float
    seed: int


class PromptCache:
    """Unit-norm text embeddings per prompt string, each string encoded once."""

    def __init__(self, encode_texts: Callable[[list[str]], Any], batch_size: int = 256) -> None:
        self.encode_texts = encode_texts
        self.batch_size = batch_size
        self.embeddings: dict[str, np.ndarray] = {}
        self.n_encoded = 0

    def add(self, texts: Sequence[str]) -> None:
        """Encode the strings not cached yet (in batches)."""
        new = [t for t in dict.fromkeys(texts) if t not in self.embeddings]
        for start in range(0, len(new), self.batch_size):
            batch = new[start : start + self.batch_size]
            encoded = encoded_array(self.encode_texts(batch))
            if encoded.shape[0] != len(batch):
                raise ValueError(f"encode_texts returned {encoded.shape[0]} rows for {len(batch)} texts")
            norms = np.linalg.norm(encoded, axis=1, keepdims=True)
            if (norms == 0).any() or not np.isfinite(norms).all():
                raise ValueError("a prompt has a zero or non-finite text embedding")
            for text, row in zip(batch, encoded / norms, strict=True):
                self.embeddings[text] = row
            self.n_encoded += len(batch)

    def lookup(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), D]`` cached embeddings (KeyError for a prompt never added)."""
        return np.stack([self.embeddings[t] for t in texts])

    def classifier(self, prompt_set: PromptSet) -> np.ndarray:
        """Unit-norm weights ``[C_called, D]`` of the called classes, by the zero-shot recipe (class_weights)."""
        class_prompts = {cls: prompt_set.prompts(cls) for cls in prompt_set.called_classes}
        self.add([p for prompts in class_prompts.values() for p in prompts])
        _, weights = class_weights(self.lookup, class_prompts, what=f"prompt set {prompt_set.name!r}")
        return weights


def encoded_array(value: Any) -> np.ndarray:
    """float64 numpy array from a numpy array or torch tensor (without importing torch)."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def pooled_scores(
    embeddings: np.ndarray, weights: np.ndarray, settings: SensitivitySettings, max_values: int = MAX_SCORE_VALUES
) -> np.ndarray:
    """Pooled slide scores ``[S, C]`` of one slide's tiles ``[N, D]`` for stacked classifiers ``[S, C, D]``.

    Equal, subset by subset, to ``pool(tile_scores(embeddings, weights[s]), ...)``; computed in blocks of
    subsets so that at most ``max_values`` tile scores exist at once.
    """
    n_subsets, n_classes, dim = weights.shape
    n_tiles = max(len(embeddings), 1)
    block = max(1, max_values // (n_tiles * n_classes))
    out = np.empty((n_subsets, n_classes), dtype=np.float64)
    for start in range(0, n_subsets, block):
        stop = min(start + block, n_subsets)
        flat = weights[start:stop].reshape(-1, dim)
        scores = tile_scores(embeddings, flat)
        pooled = pool(scores, settings.pooling, k=settings.top_k, temperature=settings.lse_temperature)
        out[start:stop] = pooled.reshape(stop - start, n_classes)
    return out


def run_prompt_sensitivity(
    prompt_set: PromptSet,
    encoder: PromptCache | Callable[[list[str]], Any],
    logit_scale: float,
    slides: Sequence[tuple[str, str, Callable[[], np.ndarray]]],
    settings: SensitivitySettings | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Prompt sensitivity of one (model, prompt set) on held-out slides.

    ``slides`` are ``(slide_id, label, load_embeddings)`` where ``load_embeddings()`` returns the slide's tile
    embeddings ``[N, D]`` (called once per slide, N > 0). ``encoder`` maps prompts to text embeddings
    (normalised or not), or is a :class:`PromptCache` (which then holds every prompt afterwards, so the caller
    can build the full set's classifier without encoding again). Returns the summary of
    :func:`histoclip.zeroshot.evaluation.prompt_sensitivity` (plus the classes, slides, number of distinct prompts
    encoded and the settings) and a table with one row per subset and one for the full set: subset,
    prompts_sha256, n_prompts (of the called classes), balanced_accuracy, macro_auc, n_scored, n_abstained,
    collapsed. ``settings`` default to the config schema's.
    """
    settings = settings or SensitivitySettings.from_config(default_config())
    called = prompt_set.called_classes
    if len(called) < 2:
        raise ValueError(f"prompt set {prompt_set.name!r} needs at least 2 called classes to call slides")
    if not slides:
        raise ValueError("no held-out labelled slides to evaluate prompt sensitivity on")
    draw_kwargs = {
        "n_subsets": settings.n_subsets,
        "template_fraction": settings.template_fraction,
        "synonym_fraction": settings.synonym_fraction,
        "seed": settings.seed,
    }
    drawn = _drawn_subsets(prompt_set, draw_kwargs)
    keys = list(drawn)
    cache = encoder if isinstance(encoder, PromptCache) else PromptCache(encoder)
    cache.add([p for cls in called for p in prompt_set.prompts(cls)])
    weights = np.stack([cache.classifier(drawn[key]) for key in keys])  # [S, C, D]
    pooled = np.empty((len(slides), len(keys), len(called)))
    labels = []
    for i, (slide_id, label, load) in enumerate(slides):
        embeddings = load()
        if len(embeddings) == 0:
            raise ValueError(f"slide {slide_id!r} has no tiles; leave it out of the held-out slides")
        pooled[i] = pooled_scores(embeddings, weights, settings)
        labels.append(label)
    results = _evaluate_subsets(pooled, keys, labels, called, logit_scale, settings)
    subset_keys = [key for key in keys if key != prompt_set.sha256]
    collapsed = sum(results[key]["collapsed"] for key in subset_keys)
    if collapsed:
        log.warning(
            "%d of %d distinct prompt subsets collapsed onto one class (column `collapsed`)",
            collapsed,
            len(subset_keys),
        )

    def score(subset: PromptSet) -> float | None:
        return results[subset.sha256]["balanced_accuracy"]

    summary = prompt_sensitivity(score, prompt_set, **draw_kwargs)
    rows = _subset_rows([*summary["subset_sha256"], prompt_set.sha256], drawn, results, called)
    summary |= {
        "prompt_set": prompt_set.name,
        "prompts_sha256": prompt_set.sha256,
        "classes": called,
        "slides": [s[0] for s in slides],
        "n_slides": len(slides),
        "n_prompts_encoded": cache.n_encoded,
        "settings": settings.__dict__,
    }
    return summary, pd.DataFrame(rows)


def _drawn_subsets(prompt_set: PromptSet, draw_kwargs: Mapping[str, Any]) -> dict[str, PromptSet]:
    """The distinct subsets :func:`prompt_sensitivity` draws (and the full set), by content hash, in draw order.

    A first pass that only collects them: with the same seed the scoring pass draws the same subsets, so every
    slide can be scored against all of them in one read.
    """
    drawn: dict[str, PromptSet] = {}

    def collect(subset: PromptSet) -> None:
        drawn.setdefault(subset.sha256, subset)
        return None

    prompt_sensitivity(collect, prompt_set, **draw_kwargs)
    return drawn


def _evaluate_subsets(
    pooled: np.ndarray,
    keys: Sequence[str],
    labels: Sequence[str],
    called: list[str],
    logit_scale: float,
    settings: SensitivitySettings,
) -> dict[str, dict[str, Any]]:
    """Each subset's slide calls (``pooled``: slides × subsets × classes) evaluated against ``labels``."""
    from histoclip.zeroshot.fewshot import quiet_evaluation

    results: dict[str, dict[str, Any]] = {}
    for j, key in enumerate(keys):
        calls = [call_slide(pooled[i, j], called, logit_scale, settings.abstain_margin) for i in range(len(pooled))]
        probabilities = np.array([[c.probabilities[cls] for cls in called] for c in calls])
        with quiet_evaluation():  # one line for all collapsed subsets below, not one per subset
            results[key] = evaluate(labels, [c.call for c in calls], probabilities, called, n_bootstrap=0)
    return results


def _subset_rows(
    keys: Sequence[str], drawn: Mapping[str, PromptSet], results: Mapping[str, Mapping[str, Any]], called: list[str]
) -> list[dict[str, Any]]:
    """One table row per subset in ``keys`` (numbered from 1), the last one the full set."""
    rows = []
    for index, key in enumerate(keys):
        subset = drawn[key]
        result = results[key]
        rows.append(
            {
                "subset": "full" if index == len(keys) - 1 else str(index + 1),
                "prompts_sha256": key,
                "n_prompts": sum(len(subset.prompts(cls)) for cls in called),
                "balanced_accuracy": result["balanced_accuracy"],
                "macro_auc": result["macro_auc"],
                "n_scored": result["n_scored"],
                "n_abstained": result["n_abstained"],
                "collapsed": result["collapsed"],
            }
        )
    return rows


def cohort_prompt_sensitivity(
    prompt_set: PromptSet,
    cache: PromptCache,
    logit_scale: float,
    weights_sha256: str,
    calls_path: str | Path,
    embedding_files: Mapping[str, str | Path],
    stored_classifier: tuple[Sequence[str], np.ndarray] | None = None,
    settings: SensitivitySettings | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """:func:`run_prompt_sensitivity` on the zero-shot rule's held-out slides, with cross-checks.

    The slides are those the zero-shot evaluation scored (:func:`histoclip.zeroshot.evaluation.evaluated_slides` of
    ``calls_path``); their tile embeddings (``embedding_files``: slide id → file) must come from the weights
    ``weights_sha256`` of the model behind ``cache``. The summary gains ``calls_balanced_accuracy`` (the zero-shot
    rule's own calls on the same slides: equal to ``full`` unless something differs between the two paths),
    ``classifier_max_abs_difference`` (against ``stored_classifier`` = (classes, weights) of the rule's
    text_classifier.parquet) and ``weights_sha256``; a mismatch is logged as a warning.
    """
    from histoclip.errors import InputError
    from histoclip.formats import called_classes, probability_column, read_tile_embeddings
    from histoclip.zeroshot.evaluation import evaluated_slides
    from histoclip.zeroshot.fewshot import read_calls

    calls = read_calls(calls_path)
    classes = called_classes(calls)
    if classes != prompt_set.called_classes:
        raise InputError(
            f"calls have classes {classes}, the prompt set {prompt_set.called_classes}",
            where=str(calls_path),
            fix="re-run the zero-shot rule with this prompt set",
        )
    held_out = evaluated_slides(calls, classes)

    def loader(slide_id: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            path = embedding_files[slide_id]
            _, _, embeddings, meta = read_tile_embeddings(path)
            if meta.get("weights_sha256") != weights_sha256:
                raise InputError(
                    f"embeddings made with weights {str(meta.get('weights_sha256'))[:12]}…, the model has "
                    f"{weights_sha256[:12]}…",
                    where=str(path),
                    fix="re-run the embedding step",
                )
            return embeddings

        return load

    slides = [(s, label, loader(s)) for s, label in zip(held_out["slide_id"], held_out["label"], strict=True)]
    summary, table = run_prompt_sensitivity(prompt_set, cache, logit_scale, slides, settings)
    predictions = [c if c else None for c in held_out["call"]]
    probabilities = held_out[[probability_column(c) for c in classes]].to_numpy(dtype=np.float64)
    from_calls = evaluate(held_out["label"].tolist(), predictions, probabilities, classes, n_bootstrap=0)
    summary["calls_balanced_accuracy"] = from_calls["balanced_accuracy"]
    summary["weights_sha256"] = weights_sha256
    drift = None
    if stored_classifier is not None:
        stored_classes, stored_weights = stored_classifier
        rows = [list(stored_classes).index(c) for c in classes]
        drift = float(np.abs(cache.classifier(prompt_set) - np.asarray(stored_weights)[rows]).max())
    summary["classifier_max_abs_difference"] = drift
    full, reference = summary["full"], summary["calls_balanced_accuracy"]
    if (full is None) != (reference is None) or (full is not None and abs(full - reference) > 1e-9):
        log.warning(
            "full prompt set: balanced accuracy %s here, %s from %s (classifier difference %s): the zero-shot "
            "rule ran with other settings, weights or prompts",
            full,
            reference,
            calls_path,
            drift,
        )
    return summary, table


def write_prompt_sensitivity(
    summary: Mapping[str, Any], table: pd.DataFrame, json_path: str | Path, table_path: str | Path
) -> None:
    """The summary as JSON and the per-subset table as TSV, both atomically."""
    import json

    from histoclip import store
    from histoclip.plots import write_tsv

    store.write_text_atomic(json_path, json.dumps(dict(summary), indent=2, default=float) + "\n")
    write_tsv(table, table_path)


def read_prompt_sensitivity(json_path: str | Path, table_path: str | Path) -> tuple[dict[str, Any], pd.DataFrame]:
    import json

    summary = json.loads(Path(json_path).read_text(encoding="utf-8"))
    table = pd.read_csv(table_path, sep="\t", dtype={"subset": str, "prompts_sha256": str})
    return summary, table


def plot_prompt_sensitivity(
    table: pd.DataFrame, stem: str | Path, style: Any, *, chance: float | None = None, title: str | None = None
) -> list[Path]:
    """Balanced accuracy of every random prompt subset (points over a box plot), the full set as a line."""
    from histoclip.plots import PALETTE, new_figure, save_figure

    subsets = table[table["subset"].astype(str) != "full"]
    values = subsets["balanced_accuracy"].astype(float).to_numpy()
    values = values[np.isfinite(values)]
    full = table.loc[table["subset"].astype(str) == "full", "balanced_accuracy"].astype(float)
    figure = new_figure(style, width_in=min(style.width_in, 4.0))
    with style.context():
        ax = figure.add_subplot()
        if len(values):
            ax.boxplot(values, positions=[0], widths=0.5, showfliers=False, medianprops={"color": PALETTE[0]})
            jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(values))
            ax.scatter(jitter, values, s=12, color=PALETTE[0], alpha=0.7, zorder=3, label="random prompt subsets")
        if len(full) and math.isfinite(full.iloc[0]):
            ax.axhline(full.iloc[0], color=PALETTE[1], linestyle="--", label="full prompt set")
        if chance is not None:
            ax.axhline(chance, color="0.6", linestyle=":", linewidth=0.8, label="chance")
        ax.set_xticks([0], [f"{len(subsets)} subsets"])
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("balanced accuracy (held-out slides)")
        ax.set_title(title or "Prompt sensitivity")
        ax.legend(loc="lower right", frameon=False)
    return save_figure(figure, stem, style, data=table, title=title)
