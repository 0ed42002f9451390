"""Evaluation metrics against scikit-learn, bootstrap intervals, collapse and abstention handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    recall_score,
    roc_auc_score,
)

from histoclip.zeroshot.evaluation import evaluate, prompt_sensitivity
from histoclip.zeroshot.prompts import load_prompt_set

PROMPTS = Path(__file__).resolve().parents[1] / "config" / "prompts"


def random_case(rng: np.random.Generator, n: int, classes: list[str], skill: float = 2.0):
    """Labels, softmax probabilities that lean towards the truth, and argmax predictions."""
    k = len(classes)
    truth = rng.integers(0, k, n)
    truth[:k] = np.arange(k)  # every class present
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), truth] += skill
    logits = np.round(logits, 1)  # ties in scores, as real probabilities have after rounding
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if k == 2:  # exact complements, so a tie in one column is a tie in the other (not 1 ulp apart)
        second = np.round(probs[:, 1], 2)
        probs = np.column_stack([1 - second, second])
    pred = probs.argmax(axis=1)
    return [classes[i] for i in truth], [classes[i] for i in pred], probs


@pytest.mark.parametrize("classes", [["LUAD", "LUSC"], ["LUSC", "LUAD"], ["CCRCC", "PRCC", "CHRCC"], list("ABCDE")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(classes, seed):
    rng = np.random.default_rng(seed)
    y_true, y_pred, probs = random_case(rng, 60 + 17 * seed, classes, skill=1.0 + seed)
    result = evaluate(y_true, y_pred, probs, classes, n_bootstrap=0)
    assert result["n"] == len(y_true) and result["n_abstained"] == 0
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
    assert result["cohen_kappa"] == pytest.approx(cohen_kappa_score(y_true, y_pred), abs=1e-12)
    # scikit-learn wants its labels sorted (our class order is the prompt file's): reorder the columns
    labels = sorted(classes)
    columns = probs[:, [classes.index(c) for c in labels]]
    if len(classes) == 2:
        expected_auc = roc_auc_score([y == labels[1] for y in y_true], columns[:, 1])
    else:
        expected_auc = roc_auc_score(y_true, columns, multi_class="ovr", average="macro", labels=labels)
    assert result["macro_auc"] == pytest.approx(expected_auc, abs=1e-12)
    cm = confusion_matrix(y_true, y_pred, labels=classes)
    assert [[result["confusion"][t][p] for p in classes] for t in classes] == cm.tolist()
    recalls = recall_score(y_true, y_pred, labels=classes, average=None)
    assert [result["per_class_recall"][c] for c in classes] == pytest.approx(recalls.tolist(), abs=1e-12)


def test_hand_computed_binary_case():
    classes = ["LUAD", "LUSC"]
    y_true = ["LUAD", "LUAD", "LUAD", "LUSC", "LUSC"]
    y_pred = ["LUAD", "LUAD", "LUSC", "LUSC", "LUAD"]
    p_lusc = np.array([0.1, 0.4, 0.6, 0.9, 0.4])
    probs = np.column_stack([1 - p_lusc, p_lusc])
    result = evaluate(y_true, y_pred, probs, classes, n_bootstrap=0)
    # recall LUAD 2/3, LUSC 1/2 → balanced accuracy 7/12
    assert result["balanced_accuracy"] == pytest.approx(7 / 12)
    assert result["per_class_recall"] == {"LUAD": pytest.approx(2 / 3), "LUSC": pytest.approx(1 / 2)}
    # AUC: pairs (LUSC, LUAD): 0.9 beats all three; 0.4 beats 0.1, ties 0.4, loses to 0.6 → (3 + 1.5) / 6
    assert result["macro_auc"] == pytest.approx(4.5 / 6)
    # kappa: po = 3/5, pe = (3·3 + 2·2)/25 = 13/25 → (15/25 - 13/25) / (12/25) = 1/6
    assert result["cohen_kappa"] == pytest.approx(1 / 6)
    assert result["confusion"] == {"LUAD": {"LUAD": 2, "LUSC": 1}, "LUSC": {"LUAD": 1, "LUSC": 1}}


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_auc_none_when_class_absent_or_no_probabilities():
    classes = ["A", "B", "C"]
    y_true = ["A", "B", "A", "B"]
    y_pred = ["A", "B", "C", "B"]
    probs = np.full((4, 3), 1 / 3)
    result = evaluate(y_true, y_pred, probs, classes, n_bootstrap=50)
    assert result["macro_auc"] is None
    assert result["ci"]["macro_auc"] == {"low": None, "high": None, "n_resamples": 0}
    assert result["per_class_recall"]["C"] is None
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert evaluate(["A", "B"], ["A", "B"], None, ["A", "B"], n_bootstrap=0)["macro_auc"] is None


def test_abstentions_counted_and_excluded():
    classes = ["A", "B"]
    y_true = ["A", "A", "B", "B", "A", "B"]
    y_pred = ["A", None, "B", None, "B", "B"]
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.49, 0.51], [0.4, 0.6], [0.3, 0.7]])
    result = evaluate(y_true, y_pred, probs, classes, n_bootstrap=0)
    assert result["n"] == 6 and result["n_abstained"] == 2 and result["n_scored"] == 4
    keep = [0, 2, 4, 5]
    kept_true = [y_true[i] for i in keep]
    kept_pred = [y_pred[i] for i in keep]
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(kept_true, kept_pred))
    assert result["cohen_kappa"] == pytest.approx(cohen_kappa_score(kept_true, kept_pred))
    assert result["macro_auc"] == pytest.approx(roc_auc_score([t == "B" for t in kept_true], probs[keep, 1]))
    assert sum(sum(row.values()) for row in result["confusion"].values()) == 4


def test_all_abstained():
    result = evaluate(["A", "B"], [None, None], None, ["A", "B"], n_bootstrap=10)
    assert result["n_scored"] == 0
    assert result["balanced_accuracy"] is None and result["cohen_kappa"] is None
    assert "abstained" in result["warning"]


def test_bootstrap_contains_estimate_and_is_deterministic():
    classes = ["A", "B", "C"]
    y_true, y_pred, probs = random_case(np.random.default_rng(7), 150, classes, skill=1.5)
    first = evaluate(y_true, y_pred, probs, classes, n_bootstrap=300, seed=5)
    again = evaluate(y_true, y_pred, probs, classes, n_bootstrap=300, seed=5)
    other = evaluate(y_true, y_pred, probs, classes, n_bootstrap=300, seed=6)
    assert first["ci"] == again["ci"]
    assert first["ci"] != other["ci"]
    for metric in ("balanced_accuracy", "macro_auc", "cohen_kappa"):
        ci = first["ci"][metric]
        assert ci["low"] < first[metric] < ci["high"], metric
        assert ci["n_resamples"] == 300
        assert ci["high"] - ci["low"] < 0.35


def test_bootstrap_resamples_by_hand():
    """The interval is the 2.5/97.5 percentile of metrics over resampled slides drawn as documented."""
    classes = ["A", "B"]
    y_true, y_pred, probs = random_case(np.random.default_rng(3), 40, classes)
    result = evaluate(y_true, y_pred, probs, classes, n_bootstrap=200, seed=11)
    rng = np.random.default_rng(11)
    values, aucs = [], []
    t, p = np.array(y_true), np.array(y_pred)
    for _ in range(200):
        pick = rng.integers(0, 40, size=40)
        values.append(balanced_accuracy_score(t[pick], p[pick]))
        if len(set(t[pick])) == 2:
            aucs.append(roc_auc_score(t[pick] == "B", probs[pick, 1]))
    assert result["ci"]["balanced_accuracy"]["low"] == pytest.approx(np.percentile(values, 2.5))
    assert result["ci"]["balanced_accuracy"]["high"] == pytest.approx(np.percentile(values, 97.5))
    assert result["ci"]["macro_auc"]["n_resamples"] == len(aucs)
    assert result["ci"]["macro_auc"]["low"] == pytest.approx(np.percentile(aucs, 2.5))


def test_collapse_flag_and_warning(caplog):
    classes = ["LUAD", "LUSC"]
    y_true = ["LUAD"] * 10 + ["LUSC"] * 10
    y_pred = ["LUSC"] * 19 + ["LUAD"]
    with caplog.at_level("WARNING", logger="histoclip.zeroshot.evaluation"):
        result = evaluate(y_true, y_pred, None, classes, n_bootstrap=0)
    assert result["collapsed"]
    assert "95%" in result["warning"] and "'LUSC'" in result["warning"] and "collapsed" in result["warning"]
    assert "collapsed" in caplog.text
    fine = evaluate(y_true, ["LUSC"] * 17 + ["LUAD"] * 3, None, classes, n_bootstrap=0)
    assert not fine["collapsed"] and fine["warning"] is None


def test_input_errors():
    with pytest.raises(ValueError, match="not among the classes"):
        evaluate(["A", "X"], ["A", "B"], None, ["A", "B"])
    with pytest.raises(ValueError, match="predictions"):
        evaluate(["A", "B"], ["A", "Z"], None, ["A", "B"])
    with pytest.raises(ValueError, match="shape"):
        evaluate(["A", "B"], ["A", "B"], np.ones((2, 3)), ["A", "B"])
    with pytest.raises(ValueError, match="labels but"):
        evaluate(["A"], ["A", "B"], None, ["A", "B"])


def test_prompt_sensitivity_summary():
    prompt_set = load_prompt_set(PROMPTS / "nsclc.yaml")
    seen: list[str] = []

    def score(ps) -> float:
        """A stand-in score with a known value per subset: the share of LUAD synonyms kept."""
        seen.append(ps.sha256)
        return len(ps.synonyms("LUAD")) / len(prompt_set.synonyms("LUAD")) - 0.01 * len(ps.templates["LUAD"])

    result = prompt_sensitivity(score, prompt_set, n_subsets=12, template_fraction=0.5, synonym_fraction=0.4, seed=4)
    # 0.4 × 5 synonyms → 2 kept; 0.5 × 8 templates → 4 kept: every subset scores 2/5 - 0.04
    assert result["values"] == pytest.approx([0.36] * 12)
    assert result["median"] == pytest.approx(0.36) and result["iqr"] == pytest.approx(0.0)
    assert result["full"] == pytest.approx(1.0 - 0.08)
    assert len(seen) == 13
    again = prompt_sensitivity(score, prompt_set, n_subsets=12, template_fraction=0.5, synonym_fraction=0.4, seed=4)
    assert again["subset_sha256"] == result["subset_sha256"]
    assert len(set(result["subset_sha256"])) > 1


def test_prompt_sensitivity_quantiles():
    prompt_set = load_prompt_set(PROMPTS / "crc-tissue.yaml")
    values = iter([0.5, 0.9, 0.7, 0.6, None, 0.8, 1.0])

    result = prompt_sensitivity(lambda ps: next(values), prompt_set, n_subsets=6, seed=0)
    scored = [0.5, 0.9, 0.7, 0.6, 0.8]
    assert result["n_undefined"] == 1
    assert result["median"] == pytest.approx(np.median(scored))
    assert result["q1"] == pytest.approx(np.percentile(scored, 25))
    assert result["iqr"] == pytest.approx(np.percentile(scored, 75) - np.percentile(scored, 25))
    assert (result["min"], result["max"]) == (0.5, 0.9)
    assert result["full"] == 1.0
