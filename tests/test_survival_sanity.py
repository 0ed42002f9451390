"""Survival that refuses nonsense: a Cox model with too few events per covariate, or whose fit does not converge,
is not fitted — its rows say why, it has no c-index, the forest plot does not draw it — and every figure says how
many patients and events each model used. Reproduced on real TCGA rows: 13 patients with a clinical row, 2 of
them with slides, 1 event between those 2 (issue 14: before, the multivariable model reported age HR 0.134,
95 % CI 0–inf, se 386, and drew it beside univariable rows fitted on 13 patients)."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter

from histoclip.config import default_config
from histoclip.plots import FigureStyle, save_figure
from histoclip.survival.analysis import SurvivalInputs, run_survival, write_survival
from histoclip.survival.cox import fit_cox
from histoclip.survival.plan import SurvivalPlan
from histoclip.survival.plots import forest_figure, km_figure
from histoclip.survival.settings import SurvivalSettings

#: 13 HNSC patients (the first of the SurvPath table: 7 events), and the 2 of them that have slides.
WITH_SLIDES = {"TCGA-BA-4074": "event at 15.4 months, age 69", "TCGA-BA-5151": "censored at 24.1 months, age 72"}


#: Set to a folder to keep the figures for a look (not needed for the assertions).
FIGURE_DIR = os.environ.get("HISTOCLIP_TEST_FIGURES", "")


def settings(**changes) -> SurvivalSettings:
    return replace(SurvivalSettings.from_config(default_config()), **changes)


def write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, sep="\t", index=False)
    return path


@pytest.fixture(scope="module")
def small_cohort(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The SurvPath CSV as it comes (13 of its patients in the cohort sheet), zero-shot calls for 2 of them."""
    source = shared_data / "clinical" / "survpath-tcga_hnsc.csv"
    patients = list(pd.read_csv(source)["case_id"].drop_duplicates().iloc[:13])
    assert set(WITH_SLIDES) <= set(patients)
    slides = {f"{pid}-DX1": pid for pid in patients}
    calls = pd.DataFrame(
        {
            "slide_id": [f"{pid}-DX1" for pid in WITH_SLIDES],
            "call": "squamous",
            "p_adenocarcinoma": [0.2, 0.3],
            "p_squamous": [0.8, 0.7],
            "n_tiles": [900, 1200],
        }
    )
    folder = tmp_path_factory.mktemp("small")
    config = default_config(
        {
            "survival": {
                "patient_column": "case_id",
                "endpoints": {"os": {"time": "survival_months", "event": "censorship", "coding": "censorship"}},
                "multivariable": ["clinical:age", "subtype:squamous"],
                "univariable": ["clinical:age", "subtype:squamous"],
                "km_groupings": ["subtype"],
            }
        }
    )
    inputs = SurvivalInputs(clinical=source, slide_patients=slides, calls=write(calls, folder / "calls.tsv"))
    return {"inputs": inputs, "plan": SurvivalPlan.from_config(config), "source": source, "folder": folder}


@pytest.fixture(scope="module")
def small_result(small_cohort: dict):
    return run_survival(small_cohort["inputs"], small_cohort["plan"])


@pytest.mark.shared_data
def test_two_patients_one_event_multivariable_model_is_not_fitted(small_cohort: dict, small_result) -> None:
    # What lifelines gives when asked anyway: an estimate with no information in it.
    raw = pd.read_csv(small_cohort["source"]).drop_duplicates("case_id").set_index("case_id").loc[list(WITH_SLIDES)]
    frame = pd.DataFrame({"time": raw["survival_months"], "event": 1 - raw["censorship"], "age": raw["age"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lifelines warns, and returns the number anyway
        direct = CoxPHFitter().fit(frame, duration_col="time", event_col="event").summary.loc["age"]
    assert direct["se(coef)"] > 100 and direct["exp(coef) upper 95%"] == np.inf
    table = small_result.multivariable.set_index("covariate")
    assert list(table.index) == ["clinical:age", "subtype:squamous"]
    assert not table["fitted"].any()
    assert table[["coef", "se", "hr", "hr_lower_95", "hr_upper_95", "p"]].isna().all().all()
    assert (table["n"] == 2).all() and (table["events"] == 1).all()
    age = table.loc["clinical:age"]
    assert age.n_covariates == 1 and age.events_per_covariate == 1.0
    assert age.note == (
        "not fitted: n = 2, 1 event(s), 1 covariate(s): 1.0 per covariate, fewer than "
        "survival.min_events_per_covariate = 5 (its estimates would be noise)"
    )
    assert table.loc["subtype:squamous", "note"].startswith("constant: every patient has 1")
    cindex = small_result.cindex
    assert len(cindex) == 1 and np.isnan(cindex["c_index"].iloc[0])
    assert cindex["note"].iloc[0].startswith("no c-index: the model was not fitted: n = 2, 1 event(s)")


@pytest.mark.shared_data
def test_univariable_rows_say_their_own_patients(small_result, caplog: pytest.LogCaptureFixture, small_cohort) -> None:
    uni = small_result.univariable.set_index("covariate")
    age = uni.loc["clinical:age"]
    assert age.fitted and age.n == 13 and age.events == 7 and np.isfinite(age.hr)
    assert age.note.startswith("few events: n = 13, 7 event(s), 1 covariate(s): 7.0 per covariate, fewer than")
    assert uni.loc["subtype:squamous", "n"] == 2 and not uni.loc["subtype:squamous", "fitted"]
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        run_survival(small_cohort["inputs"], small_cohort["plan"])
    said = [r.getMessage() for r in caplog.records if "use different patients" in r.getMessage()]
    assert len(said) == 1
    assert "univariable clinical:age n = 13 (7 events)" in said[0] and "multivariable n = 2 (1 events)" in said[0]


@pytest.mark.shared_data
def test_forest_plot_does_not_draw_what_was_not_fitted_and_gives_every_n(small_result, tmp_path: Path) -> None:
    paths = {name: tmp_path / f"{name}.tsv" for name in ("patients", "univariable", "multivariable", "cindex")}
    write_survival(
        small_result,
        **paths,
        km={"subtype": tmp_path / "km.tsv"},
        logrank={"subtype": tmp_path / "km_logrank.tsv"},
    )
    univariable = pd.read_csv(paths["univariable"], sep="\t")
    multivariable = pd.read_csv(paths["multivariable"], sep="\t")
    assert multivariable["fitted"].dtype == bool and not multivariable["fitted"].any()  # as the TSV reads back
    style = FigureStyle.from_config(default_config({"figures": {"formats": ["png"]}}))
    figure, data = forest_figure(univariable, multivariable, style)
    written = save_figure(figure, tmp_path / "forest", style, data=data)
    if FIGURE_DIR:
        save_figure(figure, Path(FIGURE_DIR) / "forest_small", style, data=data)
    assert all(p.stat().st_size > 0 for p in written)
    drawn = data[data["fitted"]]
    assert list(zip(drawn["analysis"], drawn["covariate"], drawn["n"], strict=True)) == [
        ("univariable", "clinical:age", 13)
    ]
    assert data.loc[~data["fitted"], "y"].isna().all() and drawn["y"].notna().all()
    title = figure.axes[0].get_title()
    assert "multivariable not fitted: n = 2, 1 event" in title and "univariable: n = 2–13, 1–7 events" in title
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert "multivariable not fitted: 1.0 events per covariate < 5 (n = 2, 1 event)" in texts
    assert "univariable dropped: constant: every patient has 1 (n = 2, 1 event)" in texts
    assert any(t.endswith("; n = 13, 7 events") for t in texts)
    curves, tests = pd.read_csv(tmp_path / "km.tsv", sep="\t"), pd.read_csv(tmp_path / "km_logrank.tsv", sep="\t")
    figure, _ = km_figure(curves, tests, style)
    assert figure.axes[0].get_title().endswith("n = 2, 1 event")


def test_events_per_covariate_minimum_is_where_fitting_starts() -> None:
    """10 events: 2 covariates (5 per covariate) are fitted with the default minimum of 5, 3 (3.3) are not; a
    minimum of 0 fits what converges."""
    rng = np.random.default_rng(4)
    n = 30
    x = rng.normal(size=(n, 3))
    time = rng.exponential(10.0, n) / np.exp(0.5 * x[:, 0])
    event = np.zeros(n, dtype=int)
    event[np.argsort(time)[:10]] = 1
    data = pd.DataFrame({"time": time, "event": event, "a": x[:, 0], "b": x[:, 1], "c": x[:, 2]})
    two = fit_cox(data, ["a", "b"], name="two", settings=settings())
    three = fit_cox(data, ["a", "b", "c"], name="three", settings=settings())
    assert two.fitted and two.events_per_covariate == 5.0 and "few events" in two.model_note
    assert not three.fitted and "3.3 per covariate" in three.refused
    anyway = fit_cox(data, ["a", "b", "c"], name="three", settings=settings(min_events_per_covariate=0))
    assert anyway.fitted
    quiet = fit_cox(data, ["a"], name="one", settings=settings(warn_events_per_covariate=10))
    assert quiet.fitted and quiet.model_note == ""  # 10 events for 1 covariate: no warning


def test_schema_defaults_are_five_to_fit_and_ten_to_warn() -> None:
    survival = default_config()["survival"]
    assert survival["min_events_per_covariate"] == 5 and survival["warn_events_per_covariate"] == 10
    assert survival["patient_column"] == "patient_id"
    assert survival["endpoints"] == {"os": {"time": "time", "event": "event", "coding": "event"}}
