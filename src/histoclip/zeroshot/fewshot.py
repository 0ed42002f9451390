"""Few-shot slide classification on slide embeddings, next to zero-shot on the same held-out slides.

Why: zero-shot needs no labels but depends on prompt wording; a handful of labelled slides per class is
often available. The question a study asks is "how many labelled slides does it take to beat the prompts?",
so this reports balanced accuracy against the number of shots per class, over several random draws of the
shots (with few shots, which slides are drawn matters as much as the method), with zero-shot's balanced
accuracy on exactly the same held-out slides as the reference line.

Data: the slide table of the aggregation stage (one unit-norm embedding per slide) and the zero-shot
``calls.tsv`` (slide ids, labels, split, zero-shot answers). Shots are drawn from labelled slides of the
``train`` split; every other labelled slide of a called class with tiles is held out — the slides the
zero-shot evaluation uses (:func:`histoclip.zeroshot.evaluation.evaluated_slides`). The held-out labels are never
used to choose anything: ``k``, the draws, ``C`` are fixed in the config.

A model without a text tower has no calls: the same table (slide_id, label, split, n_tiles) then comes from the
cohort sheet and the slide table (:func:`sheet_labels`), the classes are the sheet's labels (sorted), and there is
no zero-shot row. Prompt-set classes are not used for it: which classes a prompt set calls is a property of the
prompts, and such a model never reads them.

Methods, as in the few-shot evaluations of CONCH and UNI:

- **prototype** (SimpleShot-style nearest class mean): per class, the mean of its shots' L2-normalised
  embeddings; a slide is called as the class with the highest cosine similarity to the prototype. No
  parameters at all, so nothing can be over-fitted with one shot.
- **logistic** (linear probe): scikit-learn ``LogisticRegression`` with an L2 penalty and a fixed ``C``,
  lbfgs, multinomial, on the L2-normalised embeddings *without* standardisation. Standardising on a
  training set of 1–2 slides per class would divide by standard deviations estimated from two points;
  CLIP's and CONCH's linear probes use the normalised features as they are. ``C`` is fixed in advance
  (sklearn's default 1.0): with a few shots there is nothing left to tune it on without touching the held-out
  labels.

A ``k`` larger than the smallest class's pool is skipped (recorded as a note in the summary), not drawn
with replacement: a repeated slide is not a new shot.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip import formats
from histoclip.config import SectionSettings, default_config
from histoclip.errors import InputError
from histoclip.zeroshot.evaluation import evaluate, evaluated_slides

__all__ = [
    "FewShotSettings",
    "draw_shots",
    "fewshot_curve",
    "fit_logistic_probe",
    "plot_fewshot",
    "prototype_predict",
    "prototypes",
    "quiet_evaluation",
    "run_fewshot",
    "sheet_labels",
    "summarise",
]

log = logging.getLogger(__name__)

METHODS = ("prototype", "logistic")


@dataclass(frozen=True)
class FewShotSettings(SectionSettings, section="fewshot"):
    """Config key ``fewshot`` plus the run seed (``methods``: both, unless a test compares one), but its
    ``embedding_column`` (which slide-table column, read by the caller)."""

    shots: tuple[int, ...]
    draws: int
    probe_c: float
    max_iter: int
    seed: int
    methods: tuple[str, ...] = field(default=METHODS)

    def __post_init__(self) -> None:
        shots = tuple(int(k) for k in self.shots)
        if not shots or min(shots) < 1:
            raise ValueError(f"shots must be positive integers, got {self.shots}")
        object.__setattr__(self, "shots", tuple(sorted(set(shots))))
        if self.draws < 1:
            raise ValueError(f"draws must be at least 1, got {self.draws}")
        if not self.probe_c > 0:
            raise ValueError(f"probe_c must be positive, got {self.probe_c}")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown few-shot method(s) {sorted(unknown)}; choose from {METHODS}")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any() or not np.isfinite(norms).all():
        raise ValueError("embeddings with zero or non-finite norm cannot be classified")
    return x / norms


def prototypes(x: np.ndarray, y: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Unit-norm class prototypes ``[C, D]``: the renormalised mean of each class's normalised embeddings."""
    x = _unit_rows(x)
    y = np.asarray(y)
    out = np.empty((len(classes), x.shape[1]))
    for i, cls in enumerate(classes):
        members = x[y == cls]
        if len(members) == 0:
            raise ValueError(f"class {cls!r} has no shots")
        out[i] = members.mean(axis=0)
    return _unit_rows(out)


def prototype_predict(protos: np.ndarray, x: np.ndarray, classes: Sequence[str]) -> list[str]:
    """The class of the most cosine-similar prototype per row of ``x`` (ties: the class listed first)."""
    similarity = _unit_rows(x) @ protos.T
    return [classes[i] for i in np.argmax(similarity, axis=1)]


def fit_logistic_probe(x: np.ndarray, y: Sequence[str], *, c: float = 1.0, max_iter: int = 1000) -> Any:
    """L2-penalised multinomial logistic regression (lbfgs) on the L2-normalised embeddings, fixed ``C``."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=max_iter)
    return model.fit(_unit_rows(x), np.asarray(y))


def draw_shots(pool_labels: Sequence[str], classes: Sequence[str], k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices into ``pool_labels``: ``k`` distinct slides per class, drawn without replacement, class by class
    in ``classes`` order. ValueError when a class has fewer than ``k`` slides."""
    labels = np.asarray(pool_labels)
    picks = []
    for cls in classes:
        members = np.flatnonzero(labels == cls)
        if len(members) < k:
            raise ValueError(f"class {cls!r} has {len(members)} training slide(s), fewer than k = {k}")
        picks.append(np.sort(rng.choice(members, size=k, replace=False)))
    return np.concatenate(picks)


@contextlib.contextmanager
def quiet_evaluation() -> Iterator[None]:
    """evaluate() warns on every collapsed classifier; over hundreds of draws that is noise: the collapses are
    counted in the results instead."""
    logger = logging.getLogger("histoclip.zeroshot.evaluation")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _score(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    with quiet_evaluation():
        return evaluate(list(y_true), list(y_pred), None, list(classes), n_bootstrap=0)


def fewshot_curve(
    pool_x: np.ndarray,
    pool_y: Sequence[str],
    test_x: np.ndarray,
    test_y: Sequence[str],
    classes: Sequence[str],
    settings: FewShotSettings | None = None,
    pool_ids: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, dict[int, str]]:
    """Balanced accuracy on the test slides per (method, k, draw); and ``{k: why}`` for each skipped ``k``.

    Draw ``d`` of ``k`` shots uses ``numpy.random.default_rng([seed, k, d])``: the same shots for the same
    seed whatever other ``k`` are listed, and the same shots for both methods (a paired comparison).
    Columns: method, k, draw, balanced_accuracy, n_test, collapsed, shots (the slides drawn: ``pool_ids``, or
    indices into the pool without them). ``settings`` default to the config schema's.
    """
    settings = settings or FewShotSettings.from_config(default_config())
    classes = list(classes)
    pool_y = np.asarray(pool_y)
    ids = list(pool_ids) if pool_ids is not None else list(range(len(pool_y)))
    if len(ids) != len(pool_y) or len(pool_x) != len(pool_y) or len(test_x) != len(test_y):
        raise ValueError("pool embeddings, labels and ids (and test embeddings and labels) must have equal lengths")
    counts = {cls: int((pool_y == cls).sum()) for cls in classes}
    rows: list[dict[str, Any]] = []
    notes: dict[int, str] = {}
    for k in settings.shots:
        short = {cls: n for cls, n in counts.items() if n < k}
        if short:
            notes[k] = f"k = {k} skipped: " + ", ".join(
                f"{cls!r} has {n} training slide(s)" for cls, n in short.items()
            )
            continue
        for draw in range(settings.draws):
            rng = np.random.default_rng([settings.seed, k, draw])
            picks = draw_shots(pool_y, classes, k, rng)
            x, y = pool_x[picks], pool_y[picks]
            for method in settings.methods:
                if method == "prototype":
                    predicted = prototype_predict(prototypes(x, y, classes), test_x, classes)
                else:
                    probe = fit_logistic_probe(x, y, c=settings.probe_c, max_iter=settings.max_iter)
                    predicted = probe.predict(_unit_rows(test_x)).tolist()
                result = _score(test_y, predicted, classes)
                rows.append(
                    {
                        "method": method,
                        "k": k,
                        "draw": draw,
                        "balanced_accuracy": result["balanced_accuracy"],
                        "n_test": len(test_y),
                        "collapsed": result["collapsed"],
                        "shots": ",".join(str(ids[i]) for i in picks),
                    }
                )
    columns = ["method", "k", "draw", "balanced_accuracy", "n_test", "collapsed", "shots"]
    return pd.DataFrame(rows, columns=columns), notes


def summarise(
    results: pd.DataFrame, zeroshot: float | None, n_test: int, notes: dict[int, str] | None = None
) -> pd.DataFrame:
    """Median and range of balanced accuracy per (method, k), a zero-shot row, and one row per skipped ``k``.

    Columns: method, k, n_draws, median, min, max, n_test, note. The zero-shot row has ``k`` 0 and one "draw";
    there is none when ``zeroshot`` is None (a model without zero-shot calls).
    """
    rows: list[dict[str, Any]] = []
    for (method, k), group in results.groupby(["method", "k"], sort=False):
        values = group["balanced_accuracy"].astype(float)
        rows.append(
            {
                "method": method,
                "k": int(k),
                "n_draws": len(values),
                "median": float(values.median()),
                "min": float(values.min()),
                "max": float(values.max()),
                "n_test": n_test,
                "note": f"{int(group['collapsed'].sum())} draw(s) collapsed onto one class"
                if group["collapsed"].any()
                else "",
            }
        )
    if zeroshot is not None:
        zs = float(zeroshot)
        rows.append(
            {
                "method": "zeroshot",
                "k": 0,
                "n_draws": 1,
                "median": zs,
                "min": zs,
                "max": zs,
                "n_test": n_test,
                "note": "most probable class (no abstention), the same held-out slides",
            }
        )
    for k, note in (notes or {}).items():
        nan = float("nan")
        rows.append(
            {"method": "skipped", "k": k, "n_draws": 0, "median": nan, "min": nan, "max": nan, "n_test": n_test}
            | {"note": note}
        )
    return pd.DataFrame(rows, columns=["method", "k", "n_draws", "median", "min", "max", "n_test", "note"])


def read_calls(path: str | Path) -> pd.DataFrame:
    """The calls table (:func:`histoclip.formats.read_calls`), checked to have what few-shot needs: labels."""
    calls = formats.read_calls(path)
    missing = {"slide_id", "best", "n_tiles", "label"} - set(calls.columns)
    if missing:
        fix = (
            "add `label` (and `split`: train for the slides shots may be drawn from) to the cohort sheet"
            if "label" in missing
            else "re-run the zero-shot rule"
        )
        raise InputError(f"lacks column(s) {sorted(missing)}", where=str(path), fix=fix)
    return calls


def sheet_labels(sheet: str | Path, slides: pd.DataFrame) -> pd.DataFrame:
    """What few-shot reads of a calls table (slide_id, label, split, n_tiles) for a model without zero-shot calls:
    label and split from the cohort ``sheet`` ("" where a slide has none), n_tiles from the slide table frame
    ``slides`` (:func:`histoclip.formats.read_slide_embeddings`; NaN for a sheet slide it lacks)."""
    from histoclip.sheets import read_cohort_sheet

    records = read_cohort_sheet(sheet, check_files=False)
    if not any(r.label for r in records):
        raise InputError(
            "has no labels",
            where=str(sheet),
            fix="add `label` (and `split`: train for the slides shots may be drawn from) to the cohort sheet",
        )
    n_tiles = dict(zip(slides["slide_id"].astype(str), slides["n_tiles"], strict=True))
    return pd.DataFrame(
        {
            "slide_id": [r.slide_id for r in records],
            "label": [r.label or "" for r in records],
            "split": [str(r.extra.get("split", "")) for r in records],
            "n_tiles": [n_tiles.get(r.slide_id, np.nan) for r in records],
        }
    )


def run_fewshot(
    slide_table: str | Path,
    calls_path: str | Path | None,
    settings: FewShotSettings,
    *,
    embedding_column: str = "embedding",
    sheet: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Few-shot vs zero-shot for one (model, prompt set): (per-draw results, summary, facts for the log).

    Held-out slides without a slide embedding are dropped from both sides (with a warning) so that both
    numbers are always on the same slides. Without ``calls_path`` (a model without a text tower), the labelled
    slides come from the cohort ``sheet`` (:func:`sheet_labels`), the classes are its labels, sorted, and the
    summary has no zero-shot row (``facts["zeroshot_balanced_accuracy"]`` is None).
    """
    if calls_path is not None:
        calls = read_calls(calls_path)
        classes, source, what = formats.called_classes(calls), calls_path, "called classes"
        frame, matrix = formats.read_slide_embeddings(slide_table, embedding_column)
    elif sheet is not None:
        frame, matrix = formats.read_slide_embeddings(slide_table, embedding_column)
        calls = sheet_labels(sheet, frame)
        classes, source, what = sorted(set(calls["label"]) - {""}), sheet, "labels in the sheet"
    else:
        raise ValueError("run_fewshot needs the zero-shot calls or the cohort sheet")
    if len(classes) < 2:
        raise InputError(f"needs at least 2 {what}, found {classes}", where=str(source))
    has_embedding = dict(zip(frame["slide_id"].astype(str), ~np.isnan(matrix).any(axis=1), strict=True))
    row_of = {s: i for i, s in enumerate(frame["slide_id"].astype(str))}
    unknown = sorted(set(calls["slide_id"]) - set(row_of))
    if unknown:
        raise InputError(
            f"{len(unknown)} slide(s) of the {'calls' if calls_path is not None else 'sheet'} are not in the slide "
            f"table (first: {unknown[:5]})",
            where=str(slide_table),
            fix="re-run the aggregation rule for the same cohort sheet",
        )
    test = evaluated_slides(calls, classes)
    lost = [s for s in test["slide_id"] if not has_embedding[s]]
    if lost:
        log.warning("%d held-out slide(s) have no slide embedding and are left out: %s", len(lost), lost)
        test = test[[has_embedding[s] for s in test["slide_id"]]]
    if test.empty:
        raise InputError(
            "no held-out slides: every labelled slide of a called class is in the train split or has no tiles",
            where=str(source),
            fix="label some slides outside the train split (sheet columns label and split)",
        )
    split = calls["split"].astype(str).str.lower() if "split" in calls.columns else pd.Series("", index=calls.index)
    pool = calls[
        (split == "train")
        & calls["label"].isin(classes)
        & calls["slide_id"].map(lambda s: bool(has_embedding.get(s, False)))
    ]
    if pool.empty:
        raise InputError(
            "no slides to draw shots from: none is labelled with a called class in the train split",
            where=str(source),
            fix="mark the slides few-shot may learn from with split = train in the cohort sheet",
        )
    patient_of = dict(zip(frame["slide_id"].astype(str), frame["patient_id"].astype(str), strict=True))
    shared = sorted({patient_of[s] for s in pool["slide_id"]} & {patient_of[s] for s in test["slide_id"]})
    if shared:
        log.warning(
            "%d patient(s) have slides both in the train split and among the held-out slides (%s): their slides "
            "resemble each other, so few-shot accuracy is optimistic; split the sheet by patient",
            len(shared),
            ", ".join(shared[:10]),
        )
    pool_x = matrix[[row_of[s] for s in pool["slide_id"]]]
    test_x = matrix[[row_of[s] for s in test["slide_id"]]]
    results, notes = fewshot_curve(
        pool_x, pool["label"].to_numpy(), test_x, test["label"].tolist(), classes, settings, pool["slide_id"].tolist()
    )
    zeroshot = None
    if calls_path is not None:
        zeroshot = _score(test["label"].tolist(), test["best"].tolist(), classes)["balanced_accuracy"]
    for note in notes.values():
        log.warning("%s", note)
    summary = summarise(results, zeroshot, len(test), notes)
    facts = {
        "classes": classes,
        "patients_in_both_splits": shared,
        "n_test": len(test),
        "n_pool": {cls: int((pool["label"] == cls).sum()) for cls in classes},
        "zeroshot_balanced_accuracy": zeroshot,
        "test_slides": test["slide_id"].tolist(),
    }
    return results, summary, facts


def plot_fewshot(
    summary: pd.DataFrame, stem: str | Path, style: Any, *, chance: float | None = None, title: str | None = None
) -> list[Path]:
    """Balanced accuracy against shots per class: median with the range over draws per method, zero-shot (when
    the summary has its row) as a horizontal line, ``chance`` (1 / classes, the balanced accuracy of any constant
    answer) dotted. Source data: the summary rows plotted."""
    from histoclip.plots import class_colours, new_figure, save_figure

    figure = new_figure(style)
    methods = [m for m in summary["method"].unique() if m not in ("zeroshot", "skipped")]
    colours = class_colours([*METHODS, "zeroshot"])
    with style.context():
        ax = figure.add_subplot()
        for i, method in enumerate(methods):
            rows = summary[summary["method"] == method].sort_values("k")
            # methods side by side around each k (a few % on the log axis), so equal results stay visible
            x = rows["k"].to_numpy(dtype=float) * 2.0 ** (0.05 * (i - (len(methods) - 1) / 2))
            colour = colours.get(method)
            ax.plot(x, rows["median"], marker="o", color=colour, label=f"{method} (median, range over draws)")
            ax.vlines(x, rows["min"], rows["max"], color=colour, linewidth=1.5, alpha=0.6)
        zs = summary[summary["method"] == "zeroshot"]
        if len(zs) and np.isfinite(zs["median"].iloc[0]):
            ax.axhline(zs["median"].iloc[0], color=colours["zeroshot"], linestyle="--", label="zero-shot")
        if chance is not None:
            ax.axhline(chance, color="0.6", linestyle=":", linewidth=0.8, label="chance")
        if title is None and len(methods):
            versus = " vs zero-shot" if len(zs) else ""
            title = f"Few-shot{versus}, {int(summary['n_test'].iloc[0])} held-out slides"
        ax.set_xscale("log", base=2)
        ks = sorted(summary.loc[summary["method"].isin(methods), "k"].unique())
        if ks:
            ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("shots per class (k)")
        ax.set_ylabel("balanced accuracy (held-out slides)")
        ax.set_title(title or "")
        ax.legend(loc="lower right", frameon=False)
    plotted = summary[summary["method"] != "skipped"].reset_index(drop=True)
    return save_figure(figure, stem, style, data=plotted, title=title)
