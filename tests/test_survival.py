"""Survival stage: patient table from slide outputs, Cox models, c-index, Kaplan–Meier — checked against lifelines
called directly, against known simulated coefficients, and on real TCGA clinical tables."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test, proportional_hazard_test
from lifelines.utils import concordance_index

from histoclip.config import default_config, load_yaml, validate_config
from histoclip.errors import InputError
from histoclip.plots import FigureStyle, save_figure
from histoclip.survival.analysis import SurvivalInputs, run_survival, write_survival
from histoclip.survival.cindex import cross_validated_cindex
from histoclip.survival.cli import main
from histoclip.survival.cox import fit_cox
from histoclip.survival.endpoints import Endpoint, endpoint_frame, event_table_from_censorship
from histoclip.survival.groupings import parse_grouping
from histoclip.survival.km import kaplan_meier
from histoclip.survival.patients import load_slide_features, patient_calls
from histoclip.survival.plan import SurvivalPlan, required_sources
from histoclip.survival.plots import at_risk_counts, forest_figure, km_figure
from histoclip.survival.settings import SurvivalSettings
from histoclip.survival.terms import parse_term

TRUTH = {"subtype_squamous": 1.2, "necrosis_fraction": 3.0, "age": 0.04}


def write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, sep="\t", index=False)
    return path


def settings_config(seed: int = 0, **section) -> dict:
    """The config SurvivalPlan/SurvivalSettings.from_config read: the schema's fitting defaults with ``section`` on
    top (what to analyse — endpoints, terms, groupings — only as ``section`` gives it)."""
    config = default_config()
    analysed = ("endpoints", "multivariable", "univariable", "km_groupings")
    config["survival"] = {**{k: v for k, v in config["survival"].items() if k not in analysed}, **section}
    config["seed"] = seed
    return config


def plan(**section) -> SurvivalPlan:
    section.setdefault("endpoints", {"os": {}})
    return SurvivalPlan.from_config(settings_config(**section))


def survival_settings(**changes) -> SurvivalSettings:
    """The schema's default survival settings with ``changes``."""
    return replace(SurvivalSettings.from_config(default_config()), **changes)


def lifelines_fit(frame: pd.DataFrame, **kwargs) -> CoxPHFitter:
    return CoxPHFitter(**kwargs).fit(frame, duration_col="time", event_col="event")


# ------------------------------------------------------------------------------------- simulated cohort


def simulate_cohort(tmp_path: Path, n: int = 400, seed: int = 1) -> dict:
    """Patients with survival from the demo's true Cox model, and slide tables whose tile-weighted patient means
    are exactly the true covariates (some patients have two slides with different values and tile counts)."""
    rng = np.random.default_rng(seed)
    patients = [f"p{i:04d}" for i in range(n)]
    squamous = rng.permutation(np.arange(n) % 2)
    necrosis = rng.uniform(0.0, 0.34, n)
    age = np.clip(np.rint(rng.normal(64, 9, n)), 38, 88)
    lp = TRUTH["subtype_squamous"] * squamous + TRUTH["necrosis_fraction"] * necrosis + TRUTH["age"] * (age - 60)
    event_time = rng.exponential(30.0, n) / np.exp(lp)
    censor_time = rng.exponential(80.0, n)
    clinical = pd.DataFrame(
        {
            "patient_id": patients,
            "time": np.round(np.minimum(event_time, censor_time), 3) + 0.001,
            "event": (event_time <= censor_time).astype(int),
            "age": age.astype(int),
            "sex": rng.choice(["F", "M"], n, p=[0.3, 0.7]),
        }
    )
    slides, calls, classes, clusters = [], [], [], []
    cluster_of = rng.choice(["0", "1", "2"], n, p=[0.5, 0.3, 0.2])
    for i, pid in enumerate(patients):
        two = i % 5 == 0
        tiles = [int(rng.integers(50, 400)), int(rng.integers(50, 400))] if two else [int(rng.integers(50, 400))]
        if two:  # slide values spread around the truth so that the tile-weighted mean is the truth
            spread = rng.uniform(-0.05, 0.05)
            nec = [necrosis[i] + spread, necrosis[i] - spread * tiles[0] / tiles[1]]
            p_sq = [0.9, 0.45] if squamous[i] else [0.1, 0.55]  # second slide discordant, outweighed when first is big
            if squamous[i] and 0.9 * tiles[0] + 0.45 * tiles[1] <= 0.5 * sum(tiles):
                p_sq = [0.95, 0.6]
            if not squamous[i] and 0.1 * tiles[0] + 0.55 * tiles[1] >= 0.5 * sum(tiles):
                p_sq = [0.05, 0.4]
        else:
            nec = [necrosis[i]]
            p_sq = [rng.uniform(0.6, 0.95) if squamous[i] else rng.uniform(0.05, 0.4)]
        for s, (w, f, p) in enumerate(zip(tiles, nec, p_sq, strict=True)):
            slide = f"{pid}-s{s + 1}"
            slides.append({"slide_id": slide, "patient_id": pid})
            call = "squamous" if p > 0.5 else "adenocarcinoma"
            calls.append(
                {
                    "slide_id": slide,
                    "call": call,
                    "p_adenocarcinoma": 1 - p,
                    "p_squamous": p,
                    "margin": abs(2 * p - 1),
                    "abstain": False,
                    "n_tiles": w,
                    "status": "ok",
                }
            )
            classes.append({"slide_id": slide, "patient_id": pid, "n_tiles": w, "necrosis": f, "stroma": 1 - f})
            clusters.append({"slide_id": slide, "patient_id": pid, "cluster": cluster_of[i], "n_tiles": w})
    paths = {
        "clinical": write(clinical, tmp_path / "clinical.tsv"),
        "calls": write(pd.DataFrame(calls), tmp_path / "calls.tsv"),
        "class_composition": write(pd.DataFrame(classes), tmp_path / "class_composition.tsv"),
        "clusters": write(pd.DataFrame(clusters), tmp_path / "slide_clusters.tsv"),
    }
    slide_patients = {s["slide_id"]: s["patient_id"] for s in slides}
    truth = pd.DataFrame(
        {"subtype_squamous": squamous, "necrosis_fraction": necrosis, "age": age, "cluster": cluster_of}, index=patients
    )
    return {"paths": paths, "slide_patients": slide_patients, "truth": truth, "clinical": clinical}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return simulate_cohort(tmp_path_factory.mktemp("cohort"))


def cohort_inputs(cohort: dict, **overrides) -> SurvivalInputs:
    paths = cohort["paths"]
    fields = {
        "clinical": paths["clinical"],
        "slide_patients": cohort["slide_patients"],
        "calls": paths["calls"],
        "class_composition": paths["class_composition"],
        "clusters": paths["clusters"],
    }
    return SurvivalInputs(**(fields | overrides))


PIPELINE_TERMS = ["clinical:age", "subtype:squamous", "class_fraction:necrosis"]


@pytest.fixture(scope="module")
def pipeline_result(cohort: dict):
    return run_survival(cohort_inputs(cohort), plan(multivariable=PIPELINE_TERMS, km_groupings=["subtype", "cluster"]))


def test_patient_table_is_the_tile_weighted_aggregate(cohort: dict, pipeline_result) -> None:
    patients = pipeline_result.patients.set_index("patient_id")
    truth = cohort["truth"]
    calls = pd.read_csv(cohort["paths"]["calls"], sep="\t")
    calls["patient_id"] = calls["slide_id"].map(cohort["slide_patients"])
    weighted = (calls["p_squamous"] * calls["n_tiles"]).groupby(calls["patient_id"]).sum() / calls.groupby(
        "patient_id"
    )["n_tiles"].sum()
    expected_call = np.where(weighted > 0.5, "squamous", "adenocarcinoma")
    assert (patients.loc[weighted.index, "subtype_call"].to_numpy() == expected_call).all()
    assert np.array_equal(
        patients.loc[truth.index, "subtype:squamous"].to_numpy(), truth["subtype_squamous"].to_numpy()
    )
    # Two-slide patients whose slides disagree are called from the mean probabilities, not a slide vote.
    assert (calls.groupby("patient_id")["call"].nunique() > 1).sum() > 10
    np.testing.assert_allclose(
        patients.loc[truth.index, "class_fraction:necrosis"], truth["necrosis_fraction"], rtol=0, atol=1e-12
    )
    np.testing.assert_array_equal(patients.loc[truth.index, "clinical:age"], truth["age"])
    assert list(patients["event_os"]) == list(cohort["clinical"].set_index("patient_id").loc[patients.index, "event"])


def test_multivariable_cox_matches_lifelines_and_recovers_the_true_effects(cohort: dict, pipeline_result) -> None:
    truth = cohort["truth"]
    clinical = cohort["clinical"].set_index("patient_id")
    frame = pd.DataFrame(
        {
            "time": clinical["time"],
            "event": clinical["event"],
            "age": truth["age"],
            "squamous": truth["subtype_squamous"],
            "necrosis": truth["necrosis_fraction"],
        }
    )
    direct = lifelines_fit(frame)
    ph = proportional_hazard_test(direct, frame, time_transform="rank").summary["p"]
    table = pipeline_result.multivariable.set_index("covariate")
    for ours, theirs in (
        ("clinical:age", "age"),
        ("subtype:squamous", "squamous"),
        ("class_fraction:necrosis", "necrosis"),
    ):
        row, ref = table.loc[ours], direct.summary.loc[theirs]
        np.testing.assert_allclose(
            [row.coef, row.se, row.hr, row.hr_lower_95, row.hr_upper_95, row.p],
            [
                ref["coef"],
                ref["se(coef)"],
                ref["exp(coef)"],
                ref["exp(coef) lower 95%"],
                ref["exp(coef) upper 95%"],
                ref["p"],
            ],
            rtol=1e-6,
        )
        np.testing.assert_allclose(row.ph_test_p, ph[theirs], rtol=1e-6)
        assert row.n == len(frame) and row.events == frame["event"].sum()
    true = {"clinical:age": TRUTH["age"], "subtype:squamous": TRUTH["subtype_squamous"]}
    true["class_fraction:necrosis"] = TRUTH["necrosis_fraction"]
    for covariate, beta in true.items():
        row = table.loc[covariate]
        assert np.sign(row.coef) == np.sign(beta), (covariate, row.coef)
        assert np.log(row.hr_lower_95) <= beta <= np.log(row.hr_upper_95), (covariate, row.hr_lower_95, row.hr_upper_95)
    assert table.loc["subtype:squamous", "reference"] == "zero-shot call adenocarcinoma"


def test_univariable_rows_match_lifelines_per_term(cohort: dict, pipeline_result) -> None:
    clinical = cohort["clinical"].set_index("patient_id")
    uni = pipeline_result.univariable.set_index("covariate")
    assert list(uni.index) == PIPELINE_TERMS
    frame = pd.DataFrame(
        {"time": clinical["time"], "event": clinical["event"], "x": cohort["truth"]["necrosis_fraction"]}
    )
    direct = lifelines_fit(frame)
    np.testing.assert_allclose(uni.loc["class_fraction:necrosis", "coef"], direct.params_["x"], rtol=1e-6)
    np.testing.assert_allclose(
        uni.loc["class_fraction:necrosis", "lr_test_p"], direct.log_likelihood_ratio_test().p_value, rtol=1e-6
    )


def test_km_tables_and_logrank_match_lifelines(cohort: dict, pipeline_result) -> None:
    clinical = cohort["clinical"].set_index("patient_id")
    cluster = cohort["truth"]["cluster"]
    km = pipeline_result.km["cluster"]
    assert set(km["group"]) == {"cluster 0", "cluster 1", "cluster 2"}
    for label in ("0", "1", "2"):
        members = clinical[cluster == label]
        fitter = KaplanMeierFitter().fit(members["time"], members["event"])
        curve = km[km["group"] == f"cluster {label}"]
        np.testing.assert_allclose(curve["survival"], fitter.survival_function_.iloc[:, 0].to_numpy())
        np.testing.assert_array_equal(curve["n_at_risk"], fitter.event_table["at_risk"].to_numpy())
        ticks = np.array([0.0, 5.0, 17.3, 60.0, 1e4])
        expected = [(members["time"] >= t).sum() for t in ticks]
        np.testing.assert_array_equal(at_risk_counts(curve, ticks), expected)
    test = pipeline_result.logrank["cluster"].iloc[0]
    direct = multivariate_logrank_test(clinical["time"], cluster.loc[clinical.index], clinical["event"])
    assert test.n_groups == 3 and test.df == 2
    np.testing.assert_allclose([test.test_statistic, test.p], [direct.test_statistic, direct.p_value], rtol=1e-9)


def test_cluster_term_is_one_hot_against_the_largest_cluster(cohort: dict) -> None:
    result = run_survival(cohort_inputs(cohort), plan(multivariable=["cluster"]))
    table = result.multivariable
    assert list(table["covariate"]) == ["cluster:1", "cluster:2"]
    assert (table["reference"] == "cluster 0 (largest)").all()
    clinical = cohort["clinical"].set_index("patient_id")
    cluster = cohort["truth"]["cluster"]
    frame = pd.DataFrame(
        {
            "time": clinical["time"],
            "event": clinical["event"],
            "c1": (cluster == "1") * 1.0,
            "c2": (cluster == "2") * 1.0,
        }
    )
    np.testing.assert_allclose(table["coef"], lifelines_fit(frame).params_[["c1", "c2"]], rtol=1e-6)


def test_cluster_of_a_patient_is_where_most_of_its_tiles_are(tmp_path: Path) -> None:
    clusters = pd.DataFrame(
        {
            "slide_id": ["a1", "a2", "a3", "b1", "b2"],
            "patient_id": ["A", "A", "A", "B", "B"],
            "cluster": ["2", "0", "0", "1", "3"],
            "n_tiles": [500, 100, 150, 10, 10],
        }
    )
    features = load_slide_features(slide_patients=None, clusters=write(clusters, tmp_path / "c.tsv"))
    assert features.clusters.to_dict() == {"A": "2", "B": "1"}  # 500 > 250 tiles; a tie goes to the smaller label


def test_penalised_fit_matches_lifelines(cohort: dict) -> None:
    section = {"multivariable": ["clinical:age", "subtype:squamous", "clinical:sex"], "penalizer": 0.3, "l1_ratio": 0.5}
    result = run_survival(cohort_inputs(cohort), plan(**section, cv_repeats=0))
    clinical = cohort["clinical"].set_index("patient_id")
    frame = pd.DataFrame(
        {
            "time": clinical["time"],
            "event": clinical["event"],
            "age": clinical["age"],
            "sq": cohort["truth"]["subtype_squamous"],
            "female": (clinical["sex"] == "F") * 1.0,
        }
    )
    direct = lifelines_fit(frame, penalizer=0.3, l1_ratio=0.5)
    table = result.multivariable.set_index("covariate")
    assert table.loc["clinical:sex=F", "reference"].startswith("clinical:sex=M")  # most frequent level
    np.testing.assert_allclose(
        table.loc[["clinical:age", "subtype:squamous", "clinical:sex=F"], "coef"],
        direct.params_[["age", "sq", "female"]],
        rtol=1e-5,
    )
    assert (table["penalizer"] == 0.3).all()


# ------------------------------------------------------------------------------------------ c-index


def test_cross_validated_cindex_is_seeded_and_tracks_signal(cohort: dict) -> None:
    rng = np.random.default_rng(5)
    n = 300
    x = rng.normal(size=n)
    noise = rng.normal(size=n)
    t = rng.exponential(1.0, n) / np.exp(1.5 * x)
    c = rng.exponential(3.0, n)
    data = pd.DataFrame({"time": np.minimum(t, c), "event": (t <= c).astype(int), "x": x, "noise": noise})
    settings = survival_settings(cv_folds=5, cv_repeats=4, seed=3)
    full = fit_cox(data, ["x"], name="x", settings=settings)
    strong = cross_validated_cindex(data, ["x"], name="x", settings=settings, full_fit=full)
    again = cross_validated_cindex(data, ["x"], name="x", settings=settings, full_fit=full)
    other_seed = cross_validated_cindex(
        data, ["x"], name="x", settings=survival_settings(cv_folds=5, cv_repeats=4, seed=4)
    )
    null = cross_validated_cindex(data, ["noise"], name="noise", settings=settings)
    assert strong == again
    assert strong["c_index"] != other_seed["c_index"]
    assert strong["valid_folds"] == 20 and strong["failed_folds"] == 0
    # Held-out truth: the true linear predictor's c-index on all patients.
    true_c = concordance_index(data["time"], -data["x"], data["event"])
    assert abs(strong["c_index"] - true_c) < 0.03
    assert abs(strong["c_index_pooled"] - true_c) < 0.03
    assert strong["c_index_lower_95"] < strong["c_index"] < strong["c_index_upper_95"]
    assert null["c_index_lower_95"] < 0.5 < null["c_index_upper_95"]
    assert strong["apparent_c_index"] == pytest.approx(full.model.concordance_index_)


def test_cindex_table_compares_clinical_and_slide_terms(pipeline_result) -> None:
    table = pipeline_result.cindex.set_index("model")
    assert list(table.index) == ["multivariable", "clinical terms only", "slide terms only"]
    assert table.loc["multivariable", "c_index"] > table.loc["clinical terms only", "c_index"]
    assert (table["folds"] == 5).all() and (table["repeats"] == 5).all()


# --------------------------------------------------------------------------------- errors and warnings


def test_censorship_can_not_be_read_as_event() -> None:
    with pytest.raises(InputError, match="set coding: censorship"):
        Endpoint.from_config("os", {"event": "censorship"})
    with pytest.raises(InputError, match="every censored patient as an event"):
        Endpoint.from_config("os", {"event": "event", "coding": "censorship"})
    with pytest.raises(InputError, match="coding"):
        validate_config({"survival": {"endpoints": {"os": {"coding": "dead"}}}})
    with pytest.raises(InputError, match="event_value"):  # the old key is gone: the schema names it
        validate_config({"survival": {"endpoints": {"os": {"event_value": 0}}}})


def test_censorship_column_coded_censorship_flips_it() -> None:
    clinical = pd.DataFrame({"t": [1.0, 2.0, 3.0, ""], "censorship_dss": [1, 0, 0, 1]}, index=["a", "b", "c", "d"])
    frame = endpoint_frame(
        clinical, Endpoint.from_config("dss", {"time": "t", "event": "censorship_dss", "coding": "censorship"})
    )
    assert frame["event"].to_dict() == {"a": 0, "b": 1, "c": 1}  # d has no time: left out


def test_no_events_is_an_error_naming_endpoint_and_file(tmp_path: Path) -> None:
    path = write(pd.DataFrame({"patient_id": ["a", "b"], "time": [1, 2], "event": [0, 0]}), tmp_path / "clin.tsv")
    with pytest.raises(InputError) as err:
        run_survival(SurvivalInputs(clinical=path), plan(multivariable=[]))
    assert "'os'" in str(err.value) and "no events" in str(err.value) and "clin.tsv" in str(err.value)


def test_constant_covariate_is_dropped_with_a_warning(
    cohort: dict, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    clinical = cohort["clinical"].assign(site="A")
    inputs = cohort_inputs(cohort, clinical=write(clinical, tmp_path / "clinical.tsv"))
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        result = run_survival(inputs, plan(multivariable=["clinical:age", "clinical:site"], cv_repeats=0))
    row = result.multivariable.set_index("covariate").loc["clinical:site=A"]
    assert np.isnan(row.coef) and "constant" in row.note
    assert any("clinical:site=A is dropped" in r.message for r in caplog.records)
    with pytest.raises(InputError, match="every covariate of the multivariable"):
        run_survival(inputs, plan(multivariable=["clinical:site"]))


def test_patients_without_clinical_rows_are_named_and_left_out(
    cohort: dict, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    clinical = cohort["clinical"].iloc[3:]
    missing = list(cohort["clinical"]["patient_id"].iloc[:3])
    inputs = cohort_inputs(cohort, clinical=write(clinical, tmp_path / "clinical.tsv"))
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        result = run_survival(inputs, plan(multivariable=["subtype:squamous"], cv_repeats=0))
    message = next(r.getMessage() for r in caplog.records if "no row in the clinical table" in r.getMessage())
    assert all(pid in message for pid in missing)
    assert result.multivariable["n"].iloc[0] == len(clinical)
    assert not set(missing) & set(result.patients["patient_id"])


def test_convergence_failure_names_the_model_and_suggests_a_penalizer(cohort: dict, tmp_path: Path) -> None:
    clinical = cohort["clinical"].assign(age_months=cohort["clinical"]["age"] * 12 + 6)
    inputs = cohort_inputs(cohort, clinical=write(clinical, tmp_path / "clinical.tsv"))
    with pytest.raises(InputError) as err:
        run_survival(inputs, plan(multivariable=["clinical:age", "clinical:age_months"], univariable=[]))
    assert "multivariable (os)" in str(err.value) and "penalizer" in str(err.value)
    result = run_survival(
        inputs, plan(multivariable=["clinical:age", "clinical:age_months"], univariable=[], penalizer=0.1, cv_repeats=0)
    )
    assert result.multivariable["coef"].notna().all()


def test_few_events_per_covariate_warns(cohort: dict, caplog: pytest.LogCaptureFixture) -> None:
    small = cohort["clinical"].iloc[:16]
    events = int(small["event"].sum())
    assert 10 <= events < 20  # 5 to 10 events per covariate for two covariates: fitted, with a warning
    rng = np.random.default_rng(0)
    data = small.set_index("patient_id").assign(x=rng.normal(size=16), y=rng.normal(size=16))
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        fit = fit_cox(data, ["x", "y"], name="tiny", settings=survival_settings())
    assert fit.fitted and fit.events_per_covariate == events / 2
    assert "few events" in fit.model_note and "warn_events_per_covariate = 10" in fit.model_note
    assert any("tiny" in r.getMessage() and "per covariate" in r.getMessage() for r in caplog.records)


def test_abstaining_patients_leave_subtype_models(tmp_path: Path) -> None:
    calls = pd.DataFrame(
        {"slide_id": ["s1", "s2", "s3"], "call": ["a", "b", "a"], "p_a": [0.8, 0.3, 0.51], "p_b": [0.2, 0.7, 0.49]}
    )
    table = patient_calls(calls, {"s1": "A", "s2": "A", "s3": "B"}, abstain_margin=0.05)
    assert table.loc["A", "call"] == "a"  # mean (0.55, 0.45), equal weights without n_tiles
    assert table.loc["B", "call"] == ""  # margin 0.02 < 0.05
    assert table.loc["A", "n_slides"] == 2


def test_terms_groupings_and_config_are_checked() -> None:
    assert str(parse_term("class_fraction:necrosis")) == "class_fraction:necrosis"
    assert parse_term("phenotypes").name is None
    with pytest.raises(InputError, match="unknown model term"):
        parse_term("age")
    with pytest.raises(InputError, match="needs a name"):
        parse_term("subtype:")
    with pytest.raises(InputError, match="Kaplan"):
        parse_grouping("necrosis")
    with pytest.raises(InputError, match="survival.multivariable"):
        validate_config({"survival": {"multivariable": ["age"]}})
    with pytest.raises(InputError, match="duplicate"):
        plan(multivariable=["clinical:age", "clinical:age"])
    demo = SurvivalPlan.from_config(validate_config(load_yaml(Path(__file__).parents[1] / "config" / "demo.yaml")))
    assert [str(t) for t in demo.multivariable] == PIPELINE_TERMS
    assert required_sources(demo) == ["calls", "class_composition", "clusters"]
    assert required_sources(plan(multivariable=["clinical:age"])) == []


def test_missing_slide_table_for_a_term_is_an_error(cohort: dict) -> None:
    with pytest.raises(InputError, match="class composition"):
        run_survival(cohort_inputs(cohort, class_composition=None), plan(multivariable=["class_fraction:necrosis"]))
    with pytest.raises(InputError, match="not a zero-shot class"):
        run_survival(cohort_inputs(cohort), plan(multivariable=["subtype:lusc"]))


# -------------------------------------------------------------------------------------------- phenotypes


@pytest.mark.parametrize("transform", ["alr", "drop_reference"])
def test_phenotype_composition_terms(tmp_path: Path, transform: str) -> None:
    rng = np.random.default_rng(2)
    n = 120
    fractions = rng.dirichlet([4.0, 2.0, 1.0], n)
    fractions[rng.random(n) < 0.2, 2] = 0.0
    fractions /= fractions.sum(axis=1, keepdims=True)
    lp = 1.5 * fractions[:, 1] - 1.0 * fractions[:, 2]
    t = rng.exponential(10.0, n) / np.exp(lp)
    ids = [f"p{i}" for i in range(n)]
    clinical = pd.DataFrame({"patient_id": ids, "time": t, "event": (rng.random(n) < 0.8).astype(int)})
    composition = pd.DataFrame(fractions, columns=["phenotype_00", "phenotype_01", "phenotype_02"])
    composition.insert(0, "slide_id", [f"{p}-s1" for p in ids])
    composition.insert(1, "patient_id", ids)
    composition.insert(2, "n_tiles", 100)
    inputs = SurvivalInputs(
        clinical=write(clinical, tmp_path / "clinical.tsv"),
        composition=write(composition, tmp_path / "composition.tsv"),
    )
    result = run_survival(inputs, plan(multivariable=["phenotypes"], phenotype_transform=transform, cv_repeats=0))
    table = result.multivariable.set_index("covariate")
    assert list(table.index) == ["phenotypes:phenotype_01", "phenotypes:phenotype_02"]  # phenotype_00 most abundant
    if transform == "alr":
        design = np.log((fractions[:, 1:] + 0.01) / (fractions[:, [0]] + 0.01))
        assert table["reference"].iloc[0] == "log-ratio to phenotype_00 (most abundant), pseudo-count 0.01"
    else:
        design = fractions[:, 1:]
    frame = pd.DataFrame({"time": t, "event": clinical["event"], "a": design[:, 0], "b": design[:, 1]})
    np.testing.assert_allclose(table["coef"], lifelines_fit(frame).params_[["a", "b"]], rtol=1e-5)


# -------------------------------------------------------------------------------------- demo cohort truth


@pytest.fixture(scope="module")
def demo_clinical(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from histoclip.demo import make_demo_cohort

    return make_demo_cohort(tmp_path_factory.mktemp("demo"), seed=0).clinical


def test_demo_cohort_true_covariates_recover_the_simulated_effects(demo_clinical: Path) -> None:
    """The demo's 200 patients (seed 0), with the true covariates of its clinical table: every effect has the right
    sign and its 95 % interval covers the value the survival was simulated from (true_coefficients.tsv)."""
    truth = pd.read_csv(demo_clinical.parent / "true_coefficients.tsv", sep="\t").set_index("covariate")["coefficient"]
    terms = [f"clinical:{name}" for name in truth.index]
    result = run_survival(
        SurvivalInputs(clinical=demo_clinical), plan(multivariable=terms, km_groupings=["clinical:subtype"])
    )
    table = result.multivariable.set_index("covariate")
    for name, beta in truth.items():
        row = table.loc[f"clinical:{name}"]
        assert np.sign(row.coef) == np.sign(beta), (name, row.coef, beta)
        assert row.coef - 1.96 * row.se <= beta <= row.coef + 1.96 * row.se, (name, row.coef, row.se, beta)
    assert table["n"].iloc[0] == 200
    assert result.logrank["clinical:subtype"]["n_groups"].iloc[0] == 2


# ---------------------------------------------------------------------------------- real TCGA clinical tables


def tcga(shared_data: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(shared_data / "clinical" / f"survpath-tcga_{name}.csv")


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["hnsc", "coadread"])
def test_tcga_tables_convert_and_match_lifelines(shared_data: Path, tmp_path: Path, name: str) -> None:
    raw = tcga(shared_data, name)
    per_patient = raw.drop_duplicates("case_id").set_index("case_id")
    converted = event_table_from_censorship(
        pd.read_csv(shared_data / "clinical" / f"survpath-tcga_{name}.csv", dtype=str, keep_default_na=False),
        endpoints={"dss": ("survival_months_dss", "censorship_dss")},
    )
    assert converted["patient_id"].is_unique and len(converted) == raw["case_id"].nunique()
    assert "slide_id" not in converted.columns and "censorship" not in converted.columns
    indexed = converted.set_index("patient_id")
    np.testing.assert_array_equal(indexed["event"], 1 - per_patient.loc[indexed.index, "censorship"])
    np.testing.assert_array_equal(indexed["event_dss"], 1 - per_patient.loc[indexed.index, "censorship_dss"])
    path = write(converted, tmp_path / "clinical.tsv")

    endpoints = {
        "os": {},
        "dss": {"time": "time_dss", "event": "event_dss"},
        # an unconverted censorship column read the documented way: coding censorship
        "pfi": {"time": "survival_months_pfi", "event": "censorship_pfi", "coding": "censorship"},
    }
    groupings = ["clinical:is_female", "clinical:oncotree_code"] if name == "coadread" else ["clinical:is_female"]
    result = run_survival(
        SurvivalInputs(clinical=path),
        plan(endpoints=endpoints, multivariable=["clinical:age", "clinical:is_female"], km_groupings=groupings),
    )
    for endpoint, time_col, censor_col in (
        ("os", "survival_months", "censorship"),
        ("dss", "survival_months_dss", "censorship_dss"),
        ("pfi", "survival_months_pfi", "censorship_pfi"),
    ):
        frame = pd.DataFrame(
            {
                "time": per_patient[time_col],
                "event": 1 - per_patient[censor_col],
                "age": per_patient["age"],
                "is_female": per_patient["is_female"],
            }
        )
        direct = lifelines_fit(frame)
        table = result.multivariable[result.multivariable["endpoint"] == endpoint].set_index("covariate")
        np.testing.assert_allclose(table.loc[["clinical:age", "clinical:is_female"], "coef"], direct.params_, rtol=1e-6)
        np.testing.assert_allclose(
            table.loc[["clinical:age", "clinical:is_female"], "se"], direct.standard_errors_, rtol=1e-6
        )
        ph = proportional_hazard_test(direct, frame, time_transform="rank").summary["p"]
        np.testing.assert_allclose(table.loc["clinical:age", "ph_test_p"], ph["age"], rtol=1e-6)
        assert table["events"].iloc[0] == frame["event"].sum()
        for grouping in groupings:
            column = grouping.split(":")[1]
            test = result.logrank[grouping].set_index("endpoint").loc[endpoint]
            groups = per_patient[column].astype(str).str.replace(r"\.0$", "", regex=True)
            direct_test = multivariate_logrank_test(frame["time"], groups, frame["event"])
            np.testing.assert_allclose(test["p"], direct_test.p_value, rtol=1e-9)
            assert test["n_groups"] == groups.nunique()


@pytest.mark.shared_data
def test_raw_survpath_table_with_the_default_columns_is_refused_with_both_routes(shared_data: Path) -> None:
    with pytest.raises(InputError) as err:
        run_survival(SurvivalInputs(clinical=shared_data / "clinical" / "survpath-tcga_hnsc.csv"), plan())
    message = str(err.value)
    assert "missing required column(s) ['patient_id', 'time', 'event']" in message
    assert "'time' (survival.endpoints.os.time)" in message
    assert (
        "survival: {patient_column: case_id, endpoints: {os: {time: survival_months, event: censorship, "
        "coding: censorship}}} (event = 1 - censorship)" in message
    )
    assert "from-censorship" in message


@pytest.mark.shared_data
def test_conversion_cli(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "hnsc.tsv"
    assert main(["from-censorship", str(shared_data / "clinical" / "survpath-tcga_hnsc.csv"), str(out)]) == 0
    table = pd.read_csv(out, sep="\t")
    raw = tcga(shared_data, "hnsc").drop_duplicates("case_id")
    assert len(table) == len(raw) and table["event"].sum() == (1 - raw["censorship"]).sum()
    assert "patients" in capsys.readouterr().out


def test_conversion_refuses_patients_with_conflicting_survival() -> None:
    table = pd.DataFrame(
        {"case_id": ["a", "a", "b"], "survival_months": ["3", "4", "5"], "censorship": ["0", "0", "1"], "slide_id": "x"}
    )
    with pytest.raises(InputError, match="different survival values"):
        event_table_from_censorship(table)


# -------------------------------------------------------------------------------------- outputs and figures


def test_tables_and_figures_are_written_with_source_data(pipeline_result, tmp_path: Path) -> None:
    paths = {name: tmp_path / f"{name}.tsv" for name in ("patients", "univariable", "multivariable", "cindex")}
    km = {g: tmp_path / f"km_{g}.tsv" for g in ("subtype", "cluster")}
    logrank = {g: tmp_path / f"km_{g}_logrank.tsv" for g in ("subtype", "cluster")}
    write_survival(pipeline_result, **paths, km=km, logrank=logrank)
    multivariable = pd.read_csv(paths["multivariable"], sep="\t")
    assert {"covariate", "coef", "se", "hr", "hr_lower_95", "hr_upper_95", "p", "n", "events", "ph_test_p"} <= set(
        multivariable.columns
    )
    style = FigureStyle.from_config(default_config({"figures": {"formats": ["png"]}}))
    curves, tests = pd.read_csv(km["subtype"], sep="\t"), pd.read_csv(logrank["subtype"], sep="\t")
    figure, data = km_figure(curves, tests, style)
    written = save_figure(figure, tmp_path / "fig_km", style, data=data)
    assert [p.suffix for p in written] == [".png", ".tsv"] and all(p.stat().st_size > 0 for p in written)
    at_risk = data[data["kind"] == "at_risk"]
    patients = pipeline_result.patients
    for row in at_risk.itertuples():
        members = patients[patients["subtype_call"] == row.group]
        assert row.n_at_risk == (members["time_os"] >= row.time).sum()
    figure, data = forest_figure(pd.read_csv(paths["univariable"], sep="\t"), multivariable, style)
    save_figure(figure, tmp_path / "fig_forest", style, data=data)
    assert len(data) == 6 and set(data["analysis"]) == {"univariable", "multivariable"}
    np.testing.assert_allclose(data.loc[data["analysis"] == "multivariable", "hr"], multivariable["hr"])


def test_kaplan_meier_with_one_group_has_no_test() -> None:
    data = pd.DataFrame({"time": [1.0, 2.0, 3.0], "event": [1, 0, 1], "group": "x"})
    curves, test = kaplan_meier(data, endpoint="os", grouping="g")
    assert test["n_groups"] == 1 and np.isnan(test["p"]) and "one group" in test["note"]
    assert curves["n_at_risk"].iloc[0] == 3


def test_slide_aggregation_is_linear_in_slides(tmp_path: Path) -> None:
    """20,000 slides aggregate in seconds: no step is quadratic in patients or slides."""
    rng = np.random.default_rng(0)
    n = 20_000
    ids = [f"s{i}" for i in range(n)]
    patients = {s: f"p{i // 2}" for i, s in enumerate(ids)}
    p = rng.random(n)
    calls = pd.DataFrame({"slide_id": ids, "call": "", "p_a": p, "p_b": 1 - p, "n_tiles": rng.integers(1, 500, n)})
    clusters = pd.DataFrame({"slide_id": ids, "cluster": rng.integers(0, 6, n), "n_tiles": rng.integers(1, 500, n)})
    calls_path, clusters_path = write(calls, tmp_path / "calls.tsv"), write(clusters, tmp_path / "clusters.tsv")
    start = time.perf_counter()
    features = load_slide_features(slide_patients=patients, calls=calls_path, clusters=clusters_path)
    elapsed = time.perf_counter() - start
    assert len(features.calls) == n // 2 and len(features.clusters) == n // 2
    assert elapsed < 10, f"aggregating {n} slides took {elapsed:.1f} s"


def test_separation_is_not_reported_as_a_fit(caplog: pytest.LogCaptureFixture) -> None:
    """20 events, one covariate that puts every early death on one side: the likelihood has no maximum (the
    coefficient runs to infinity); lifelines warns and returns a number, which is not reported."""
    data = pd.DataFrame({"time": np.arange(1.0, 21.0), "event": 1, "early": (np.arange(20) < 10) * 1.0})
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        fit = fit_cox(data, ["early"], name="separated", settings=survival_settings())
    assert not fit.fitted and fit.refused.startswith("not fitted: did not converge")
    assert "survival.penalizer" in fit.refused
    assert any("separated" in r.getMessage() and "penalizer" in r.getMessage() for r in caplog.records)
    penalised = fit_cox(data, ["early"], name="separated", settings=survival_settings(penalizer=0.1))
    assert penalised.fitted and np.isfinite(penalised.model.params_["early"])
