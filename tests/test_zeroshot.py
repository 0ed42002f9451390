"""Zero-shot maths on cases small enough to compute by hand, plus one run through a real open_clip model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from histoclip.zeroshot.classifier import SlideCall, call_slide, pool, probabilities, text_classifier, tile_scores
from histoclip.zeroshot.prompts import load_prompt_set

REPO = Path(__file__).resolve().parents[1]

TWO_BY_TWO = """\
templates: ["CLASSNAME.", "an image of CLASSNAME."]
classes:
  A: {synonyms: ["a1", "a2"]}
  B: {synonyms: ["b1"]}
"""

# A deterministic text encoder for tests: fixed, deliberately unnormalised 2-D vectors per prompt.
VECTORS = {
    "a1.": [3.0, 0.0],  # unit (1, 0)
    "an image of a1.": [0.0, 2.0],  # unit (0, 1)
    "a2.": [1.0, 1.0],  # unit (1, 1)/√2
    "an image of a2.": [4.0, -3.0],  # unit (0.8, -0.6)
    "b1.": [0.0, -5.0],  # unit (0, -1)
    "an image of b1.": [-1.0, 0.0],  # unit (-1, 0)
}


def fake_encoder(calls: list[list[str]] | None = None):
    def encode(texts: list[str]) -> np.ndarray:
        if calls is not None:
            calls.append(list(texts))
        return np.asarray([VECTORS[t] for t in texts], dtype=np.float32)

    return encode


@pytest.fixture
def two_by_two(tmp_path):
    path = tmp_path / "hand.yaml"
    path.write_text(TWO_BY_TWO)
    return load_prompt_set(path)


def test_text_classifier_by_hand(two_by_two):
    calls: list[list[str]] = []
    classes, weights = text_classifier(fake_encoder(calls), two_by_two, batch_size=4)
    assert classes == ["A", "B"]
    assert [len(c) for c in calls] == [4, 2]  # batched across classes
    # A: mean of (1,0), (0,1), (1/√2, 1/√2), (0.8,-0.6) = ((1.8 + 1/√2)/4, (0.4 + 1/√2)/4), renormalised
    r = 1 / math.sqrt(2)
    ax, ay = 1.8 + r, 0.4 + r
    norm = math.hypot(ax, ay)
    # B: mean of (0,-1), (-1,0) = (-0.5,-0.5) → (-1/√2, -1/√2)
    expected = np.array([[ax / norm, ay / norm], [-r, -r]])
    assert weights.dtype == np.float64
    np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1.0, atol=1e-12)


def test_text_classifier_batch_size_does_not_matter(two_by_two):
    _, one = text_classifier(fake_encoder(), two_by_two, batch_size=1)
    _, many = text_classifier(fake_encoder(), two_by_two, batch_size=256)
    np.testing.assert_allclose(one, many, atol=1e-15)


def test_text_classifier_rejects_bad_encoder(two_by_two):
    with pytest.raises(ValueError, match="shape"):
        text_classifier(lambda texts: np.zeros((1, 2)), two_by_two)
    with pytest.raises(ValueError, match="zero or non-finite norm"):
        text_classifier(lambda texts: np.zeros((len(texts), 2)), two_by_two)


def test_tile_scores_cosine_and_renormalised():
    weights = np.array([[1.0, 0.0], [0.6, 0.8]])
    tiles = np.array([[2.0, 0.0], [0.0, 0.5], [3.0, 4.0]], dtype=np.float16)
    scores = tile_scores(tiles, weights)
    expected = np.array([[1.0, 0.6], [0.0, 0.8], [0.6, 1.0]])
    np.testing.assert_allclose(scores, expected, atol=1e-12)
    assert scores.dtype == np.float64
    assert tile_scores(np.zeros((0, 2), np.float32), weights).shape == (0, 2)
    with pytest.raises(ValueError, match="pre-projection"):
        tile_scores(np.ones((3, 4)), weights)


SCORES = np.array(
    [
        [0.10, 0.50],
        [0.40, 0.20],
        [0.30, 0.30],
    ]
)


def test_pool_topk():
    np.testing.assert_allclose(pool(SCORES, "topk", k=2), [(0.40 + 0.30) / 2, (0.50 + 0.30) / 2], atol=1e-15)
    np.testing.assert_allclose(pool(SCORES, "topk", k=1), [0.40, 0.50], atol=1e-15)
    # K larger than the number of tiles: the mean of all tiles
    np.testing.assert_allclose(pool(SCORES, "topk", k=50), [0.8 / 3, 1.0 / 3], atol=1e-15)
    with pytest.raises(ValueError, match="k >= 1"):
        pool(SCORES, "topk", k=0)


def test_pool_mean_and_lse():
    np.testing.assert_allclose(pool(SCORES, "mean"), [0.8 / 3, 1.0 / 3], atol=1e-15)
    t = 10.0
    lse_a = math.log((math.exp(1.0) + math.exp(4.0) + math.exp(3.0)) / 3) / t
    lse_b = math.log((math.exp(5.0) + math.exp(2.0) + math.exp(3.0)) / 3) / t
    np.testing.assert_allclose(pool(SCORES, "lse", temperature=t), [lse_a, lse_b], rtol=1e-13)
    # limits: a large temperature approaches the max, a small one the mean; huge values don't overflow
    np.testing.assert_allclose(pool(SCORES, "lse", temperature=1e6), [0.40, 0.50], atol=1e-5)
    np.testing.assert_allclose(pool(SCORES, "lse", temperature=1e-6), [0.8 / 3, 1.0 / 3], atol=1e-6)
    assert np.isfinite(pool(SCORES * 1e4, "lse", temperature=100.0)).all()


def test_pool_errors():
    with pytest.raises(ValueError, match="no tiles"):
        pool(np.zeros((0, 2)), "topk", k=5)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(SCORES, "max")
    with pytest.raises(ValueError, match="temperature"):
        pool(SCORES, "lse", temperature=0.0)


def test_probabilities_logit_scale_100():
    p = probabilities(np.array([0.30, 0.28]), 100.0)
    # softmax(30, 28) = (e^2, 1) / (e^2 + 1)
    np.testing.assert_allclose(p, [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)], rtol=1e-14)
    three = probabilities(np.array([0.2, 0.21, 0.19]), 100.0)
    denom = math.exp(-1) + 1 + math.exp(-2)
    np.testing.assert_allclose(three, [math.exp(-1) / denom, 1 / denom, math.exp(-2) / denom], rtol=1e-14)
    # batched rows, and no overflow at scales far beyond float range if done naively
    batch = probabilities(np.array([[0.30, 0.28], [1e6, 0.0]]), 100.0)
    np.testing.assert_allclose(batch.sum(axis=1), 1.0)
    np.testing.assert_allclose(batch[1], [1.0, 0.0])
    with pytest.raises(ValueError, match="exponentiated"):
        probabilities(np.array([0.1, 0.2]), 0.0)


def test_call_slide_abstains_below_margin_only():
    classes = ["LUAD", "LUSC"]
    scores = np.array([0.30, 0.28])
    p_best = math.exp(2) / (math.exp(2) + 1)
    margin = 2 * p_best - 1  # ≈ 0.7616
    called = call_slide(scores, classes, 100.0, abstain_margin=0.5)
    assert called == SlideCall(
        call="LUAD",
        best="LUAD",
        probabilities={"LUAD": pytest.approx(p_best), "LUSC": pytest.approx(1 - p_best)},
        margin=pytest.approx(margin),
        abstain=False,
    )
    abstained = call_slide(scores, classes, 100.0, abstain_margin=0.8)
    assert abstained.call is None and abstained.abstain
    assert abstained.best == "LUAD"
    assert abstained.margin == pytest.approx(margin)
    # second-best, not last: margin over three classes
    three = call_slide(np.array([0.19, 0.21, 0.20]), ["x", "y", "z"], 100.0, 0.0)
    assert three.best == "y"
    denom = math.exp(-2) + 1 + math.exp(-1)
    assert three.margin == pytest.approx((1 - math.exp(-1)) / denom)


def test_call_slide_ties():
    tie = call_slide(np.array([0.25, 0.25]), ["A", "B"], 100.0, abstain_margin=0.05)
    assert tie.margin == 0.0 and tie.abstain and tie.call is None
    assert tie.best == "A"  # ties go to the first-listed class
    no_abstention = call_slide(np.array([0.25, 0.25]), ["A", "B"], 100.0, abstain_margin=0.0)
    assert no_abstention.call == "A" and not no_abstention.abstain
    top_tie = call_slide(np.array([0.1, 0.3, 0.3]), ["A", "B", "C"], 100.0, abstain_margin=0.0)
    assert top_tie.best == "B" and top_tie.margin == 0.0


def test_call_slide_errors():
    with pytest.raises(ValueError, match="at least 2"):
        call_slide(np.array([0.3]), ["A"], 100.0, 0.1)
    with pytest.raises(ValueError, match="one per called class"):
        call_slide(np.array([0.3, 0.2, 0.1]), ["A", "B"], 100.0, 0.1)


def test_end_to_end_by_hand(two_by_two):
    """Text classifier → tile scores → top-K → call, on tiles placed at known angles."""
    classes, weights = text_classifier(fake_encoder(), two_by_two)
    tiles = np.vstack([weights[0] * 2, weights[1], -weights[1], weights[0]]).astype(np.float16)
    scores = tile_scores(tiles, weights)
    cos_ab = float(weights[0] @ weights[1])
    np.testing.assert_allclose(scores[:, 0], [1, cos_ab, -cos_ab, 1], atol=2e-3)
    slide = pool(scores, "topk", k=2)
    # B's column is (cos_ab, 1, -1, cos_ab): its top two are 1 and cos_ab
    assert -1 < cos_ab < 0
    np.testing.assert_allclose(slide, [1.0, (1.0 + cos_ab) / 2], atol=2e-3)
    result = call_slide(slide, classes, 100.0, 0.1)
    assert result.call == "A" and result.margin == pytest.approx(1.0, abs=1e-12)


def test_real_open_clip_model(tmp_path):
    """Shapes, dtype and unit norm with a real tokenizer and text tower (random weights, seeded)."""
    torch = pytest.importorskip("torch")
    from histoclip.embedding.models import ModelSpec, load_model

    model = load_model(ModelSpec("tiny", str(REPO / "config" / "models" / "tiny-vit.json")), "cpu")
    prompt_set = load_prompt_set(REPO / "config" / "prompts" / "demo.yaml")
    seen: list[int] = []

    def encode(texts: list[str]) -> np.ndarray:
        seen.append(len(texts))
        out = model.encode_texts(texts)
        assert isinstance(out, torch.Tensor)
        return out.cpu().numpy()

    classes, weights = text_classifier(encode, prompt_set, batch_size=64)
    assert classes == prompt_set.all_classes
    assert weights.shape == (6, model.dim)
    assert sum(seen) == sum(len(prompt_set.prompts(c)) for c in classes) == 6 * 4 * 6
    assert max(seen) <= 64
    np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1.0, atol=1e-12)
    # a torch tensor straight from the model is accepted too, and gives the same weights
    _, direct = text_classifier(model.encode_texts, prompt_set, batch_size=256)
    np.testing.assert_allclose(direct, weights, atol=1e-5)
    tiles = model.encode_tiles(torch.zeros(3, 224, 224, 3, dtype=torch.uint8)).numpy().astype(np.float16)
    scores = tile_scores(tiles, weights)
    assert scores.shape == (3, 6) and np.all(np.abs(scores) <= 1 + 1e-9)
    slide = pool(scores, "topk", k=50)
    called = call_slide(slide[: len(prompt_set.classes)], prompt_set.called_classes, model.logit_scale, 0.0)
    assert called.best in prompt_set.called_classes
    assert sum(called.probabilities.values()) == pytest.approx(1.0)
