"""Image + clinical survival: the three models on the same folds, and nothing fitted on a test fold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from histoclip.config import default_config
from histoclip.formats import vectors_column, write_slide_embeddings
from histoclip.survival.multimodal import (
    MultimodalData,
    MultimodalSettings,
    cross_validated_multimodal,
    run_multimodal,
)
from histoclip.survival.plan import SurvivalPlan

SETTINGS = MultimodalSettings.from_config(default_config({"survival": {"multimodal": {"n_components": 4}}}))


def simulated(n: int = 120, dim: int = 16, image_effect: float = 1.2, seed: int = 0) -> MultimodalData:
    """Hazard = exp(0.04 (age - 60) + image_effect × the embedding's first axis): the slides carry risk the clinic
    does not see. Exponential times, uniform censoring (~30 %)."""
    rng = np.random.default_rng(seed)
    age = rng.normal(60, 10, n)
    signal = rng.normal(0, 1, n)
    image = rng.normal(0, 0.3, (n, dim))
    image[:, 0] += signal
    hazard = np.exp(0.04 * (age - 60) + image_effect * signal)
    time = rng.exponential(12 / hazard)
    censor = rng.uniform(0, 40, n)
    return MultimodalData(
        patients=[f"P{i}" for i in range(n)],
        time=np.minimum(time, censor),
        event=(time <= censor).astype(float),
        clinical=age[:, None],
        clinical_names=["clinical:age"],
        image=image,
    )


def rows_by_model(rows):
    return {row["model"]: row for row in rows}


def test_slides_that_carry_risk_add_to_the_clinical_model():
    rows, _ = cross_validated_multimodal(simulated(), SETTINGS, folds=5, repeats=2, seed=0, clinical_penalty=0.0)
    by = rows_by_model(rows)
    assert set(by) == {"clinical", "image", "combined"}
    for row in by.values():  # every row with its interval, on the same 10 folds
        assert row["valid_folds"] == 10 and row["c_index_lower_95"] <= row["c_index"] <= row["c_index_upper_95"]
    assert by["image"]["c_index"] > 0.7 and by["combined"]["c_index"] > by["clinical"]["c_index"] + 0.05
    assert by["combined"]["delta_lower_95"] > 0  # better than clinical in every fold but the worst 2.5 %
    assert by["image"]["n_components"] == 4 and by["clinical"]["n_components"] == 0


def test_slides_without_risk_score_at_chance():
    rows, _ = cross_validated_multimodal(
        simulated(image_effect=0.0, seed=1), SETTINGS, folds=5, repeats=2, seed=0, clinical_penalty=0.0
    )
    assert abs(rows_by_model(rows)["image"]["c_index"] - 0.5) < 0.08


def test_nothing_is_fitted_on_the_test_fold():
    """Changing a fold's test patients arbitrarily (embeddings, age, follow-up time) leaves everything that fold
    fitted unchanged (PCA, scaling, chosen penalties, coefficients); the other folds, which train on them, change.
    (Their event flags stay: the folds are stratified by event, so they decide which fold a patient is in.)"""
    data = simulated(n=80)
    _, fits = cross_validated_multimodal(data, SETTINGS, folds=4, repeats=1, seed=3, clinical_penalty=0.0)
    from histoclip.survival.cindex import _stratified_folds

    test = _stratified_folds(data.event.astype(int), 4, np.random.default_rng([3, 0])) == 0
    rng = np.random.default_rng(99)
    changed = MultimodalData(
        data.patients,
        np.where(test, rng.uniform(0.1, 100, len(test)), data.time),
        data.event,
        np.where(test[:, None], rng.normal(30, 20, data.clinical.shape), data.clinical),
        data.clinical_names,
        np.where(test[:, None], rng.normal(0, 5, data.image.shape), data.image),
    )
    _, refits = cross_validated_multimodal(changed, SETTINGS, folds=4, repeats=1, seed=3, clinical_penalty=0.0)
    same, other = fits[(0, 0)], refits[(0, 0)]
    assert np.array_equal(same.reducer.components, other.reducer.components)
    assert np.array_equal(same.reducer.mean, other.reducer.mean) and np.array_equal(
        same.reducer.scale, other.reducer.scale
    )
    assert np.array_equal(same.clinical_scaler.mean, other.clinical_scaler.mean)
    assert same.penalizer == other.penalizer
    for model in ("clinical", "image", "combined"):
        assert np.array_equal(same.coefficients[model], other.coefficients[model]), model
    assert not np.array_equal(fits[(0, 1)].reducer.mean, refits[(0, 1)].reducer.mean)


def test_the_table_of_a_cohort_from_its_files(tmp_path):
    data = simulated(n=60)
    clinical = pd.DataFrame(
        {"patient_id": data.patients, "time": data.time, "event": data.event.astype(int), "age": data.clinical[:, 0]}
    )
    clinical.to_csv(tmp_path / "clinical.tsv", sep="\t", index=False)
    slides = [f"{p}-s1" for p in data.patients]
    table = pa.table(
        {
            "slide_id": slides,
            "patient_id": data.patients,
            "n_tiles": [10] * 60,
            "embedding": vectors_column(list(data.image), data.image.shape[1]),
        }
    )
    write_slide_embeddings(tmp_path / "slides.parquet", table, {})
    config = default_config({"survival": {"multivariable": ["clinical:age"], "cv_repeats": 1}})
    plan = SurvivalPlan.from_config(config)
    result = run_multimodal(
        tmp_path / "clinical.tsv",
        dict(zip(slides, data.patients, strict=True)),
        tmp_path / "slides.parquet",
        plan,
        MultimodalSettings.from_config(config),
    )
    assert result["model"].tolist() == ["clinical", "image", "combined"]
    assert (result["endpoint"] == "os").all() and (result["n"] == 60).all()
    assert result.loc[0, "covariates"] == "clinical:age" and result["c_index"].notna().all()
    assert result.loc[2, "penalizer_median"] in SETTINGS.penalizers
    from histoclip.plots import FigureStyle
    from histoclip.survival.multimodal import plot_multimodal

    written = plot_multimodal(result, tmp_path / "figure", FigureStyle.from_config(config), title="t")
    assert pd.read_csv(tmp_path / "figure.tsv", sep="\t")["model"].tolist() == ["clinical", "image", "combined"]
    assert all(p.stat().st_size for p in written)
