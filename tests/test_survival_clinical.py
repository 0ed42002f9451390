"""The clinical table as it comes (histoclip.survival.clinical): columns named by the config, event or censorship
coding, several rows per patient, every problem named with its line and column — and the real TCGA/SurvPath CSVs
read directly, giving per patient exactly what the `from-censorship` converter gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from histoclip.config import default_config, validate_config
from histoclip.errors import InputError
from histoclip.survival.analysis import SurvivalInputs, run_survival
from histoclip.survival.cli import main
from histoclip.survival.clinical import ClinicalLayout, read_clinical_table
from histoclip.survival.endpoints import Endpoint, endpoint_frame
from histoclip.survival.plan import SurvivalPlan

#: The three endpoints of a SurvPath table, read as they come.
SURVPATH_ENDPOINTS = {
    "os": {"time": "survival_months", "event": "censorship", "coding": "censorship"},
    "dss": {"time": "survival_months_dss", "event": "censorship_dss", "coding": "censorship"},
    "pfi": {"time": "survival_months_pfi", "event": "censorship_pfi", "coding": "censorship"},
}


def write(path: Path, rows: list[list[str]], sep: str = "\t") -> Path:
    path.write_text("\n".join(sep.join(r) for r in rows) + "\n")
    return path


def survpath_config(**survival) -> dict:
    """The validated default config with the survival section a user writes for a SurvPath table."""
    return default_config({"survival": {"patient_column": "case_id", "endpoints": SURVPATH_ENDPOINTS, **survival}})


# ------------------------------------------------------------------------------------ our own layout


def test_clinical_table_types_and_missing_patients(tmp_path: Path) -> None:
    table = write(
        tmp_path / "clinical.tsv",
        [
            ["patient_id", "time", "event", "age", "stage"],
            ["P1", "12.5", "1", "61", "II"],
            ["P2", "30", "0", "70", "I"],
        ],
    )
    clinical = read_clinical_table(table, ["P1", "P2", "P3", "P9"])
    assert clinical.missing_patients == ["P3", "P9"]
    assert list(clinical.table.index) == ["P1", "P2"] and clinical.table.index.name == "patient_id"
    assert clinical.table["time"].tolist() == [12.5, 30.0]
    assert clinical.table["event"].tolist() == [1, 0]
    assert clinical.table["age"].dtype.kind in "if"
    assert clinical.table["stage"].tolist() == ["II", "I"]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (["P1", "-3", "1"], ["line 2", "'time'", "'-3'", "P1", "not a time ≥ 0"]),
        (["P1", "soon", "1"], ["line 2", "'time'", "'soon'"]),
        (["P1", "inf", "1"], ["line 2", "'time'", "'inf'"]),
        (["P1", "3", "2"], ["line 2", "'event'", "'2'", "0 or 1"]),
        (["P1", "3", "yes"], ["line 2", "'event'", "censored", "coding: censorship"]),
        (["", "3", "1"], ["line 2", "'patient_id'", "empty patient id"]),
    ],
)
def test_bad_clinical_rows(tmp_path: Path, row: list[str], expected: list[str]) -> None:
    table = write(tmp_path / "clinical.tsv", [["patient_id", "time", "event"], row])
    with pytest.raises(InputError) as err:
        read_clinical_table(table)
    for part in expected:
        assert part in str(err.value)


def test_every_problem_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    table = write(tmp_path / "c.tsv", [["patient_id", "time", "event"], ["P1", "x", "1"], ["P2", "1", "7"]])
    with pytest.raises(InputError) as err:
        read_clinical_table(table)
    message = str(err.value)
    assert "2 problem(s)" in message and message.index("line 2") < message.index("line 3")


def test_empty_cells_are_missing_follow_up_not_errors(tmp_path: Path) -> None:
    """An empty or NA cell: that patient has no value for the endpoint and is left out of it when analysed."""
    table = write(
        tmp_path / "c.tsv", [["patient_id", "time", "event"], ["P1", "", "1"], ["P2", "4", "NA"], ["P3", "5", "1"]]
    )
    clinical = read_clinical_table(table).table
    assert np.isnan(clinical.loc["P1", "time"]) and clinical["event"].isna().tolist() == [False, True, False]
    frame = endpoint_frame(clinical, Endpoint("os"))
    assert list(frame.index) == ["P3"]


def test_several_rows_of_a_patient_must_agree_and_are_read_once(tmp_path: Path) -> None:
    rows = [
        ["patient_id", "slide_id", "time", "event", "age"],
        ["P1", "s1", "10", "1", "60"],
        ["P1", "s2", "10", "1", "60"],
        ["P2", "s3", "4", "0", "70"],
    ]
    clinical = read_clinical_table(write(tmp_path / "ok.tsv", rows))
    assert list(clinical.table.index) == ["P1", "P2"]
    assert clinical.slide_level_columns == ["slide_id"] and "slide_id" not in clinical.table.columns
    assert clinical.table.loc["P1", "age"] == 60
    rows[2] = ["P1", "s2", "12", "0", "60"]
    with pytest.raises(InputError) as err:
        read_clinical_table(write(tmp_path / "bad.tsv", rows))
    message = str(err.value)
    assert "lines 2, 3" in message and "patient 'P1' has rows with different survival values" in message
    assert "event 1 vs 0" in message and "time 10 vs 12" in message


def test_a_term_on_a_slide_level_column_says_so(tmp_path: Path) -> None:
    rows = [["patient_id", "time", "event", "block"], ["P1", "10", "1", "A"], ["P1", "10", "1", "B"]]
    rows += [[f"Q{i}", str(i + 1), str(i % 2), "A"] for i in range(8)]
    path = write(tmp_path / "c.tsv", rows)
    plan = SurvivalPlan.from_config(default_config({"survival": {"multivariable": ["clinical:block"]}}))
    with pytest.raises(InputError, match="clinical:block read.*differs between rows of one patient"):
        run_survival(SurvivalInputs(clinical=path), plan)


def test_cohort_checks_name_the_endpoint_and_its_coding(tmp_path: Path) -> None:
    table = write(tmp_path / "c.tsv", [["case", "months", "censored"], ["P1", "3", "1"], ["P2", "5", "1"]])
    layout = ClinicalLayout("case", (Endpoint("os", "months", "censored", "censorship"),))
    with pytest.raises(InputError) as err:
        read_clinical_table(table, ["P1", "P2"], layout=layout)
    message = str(err.value)
    expected = "no events: all 2 patients of the cohort are censored for endpoint 'os' (time 'months', event "
    assert expected + "'censored', 1 = censored)" in message
    assert "censored = 1 or empty" in message and "column 'censored'" in message
    with pytest.raises(InputError) as err:
        read_clinical_table(table, ["TCGA-01"], layout=layout)
    assert "none of the 1 patients" in str(err.value) and "column 'case'" in str(err.value)


def test_missing_columns_name_the_config_keys(tmp_path: Path) -> None:
    table = write(tmp_path / "c.tsv", [["patient", "t", "e"], ["P1", "3", "1"]])
    layout = ClinicalLayout("patient", (Endpoint("os", "t", "e"), Endpoint("dss", "t_dss", "e_dss")))
    with pytest.raises(InputError) as err:
        read_clinical_table(table, layout=layout)
    message = str(err.value)
    assert "missing required column(s) ['t_dss', 'e_dss']" in message
    assert "'t_dss' (survival.endpoints.dss.time), 'e_dss' (survival.endpoints.dss.event)" in message
    comma = write(tmp_path / "c2.tsv", [["patient_id", "time", "event"], ["P1", "3", "1"]], sep=",")
    with pytest.raises(InputError, match="looks comma-separated"):
        read_clinical_table(comma)


def test_layout_comes_from_the_config_and_checks_the_coding() -> None:
    layout = ClinicalLayout.from_config(survpath_config())
    assert layout.patient_column == "case_id"
    assert [(e.name, e.event, e.event_value) for e in layout.endpoints] == [
        ("os", "censorship", 0),
        ("dss", "censorship_dss", 0),
        ("pfi", "censorship_pfi", 0),
    ]
    assert ClinicalLayout.from_config(default_config()) == ClinicalLayout()
    wrong = default_config({"survival": {"endpoints": {"os": {"time": "survival_months", "event": "censorship"}}}})
    with pytest.raises(InputError, match="set coding: censorship"):
        ClinicalLayout.from_config(wrong)


def test_csv_and_tsv_give_the_same_table(tmp_path: Path) -> None:
    rows = [["patient_id", "time", "event", "age"], ["P1", "3", "1", "50"], ["P2", "7", "0", "61"]]
    tsv = read_clinical_table(write(tmp_path / "c.tsv", rows)).table
    csv = read_clinical_table(write(tmp_path / "c.csv", rows, sep=",")).table
    pd.testing.assert_frame_equal(tsv, csv)


# ------------------------------------------------------------------------------- real TCGA/SurvPath CSVs


@pytest.mark.shared_data
def test_the_readme_config_for_a_tcga_csv_works(shared_data: Path, repo: Path) -> None:
    """The README's example (the YAML block after "Clinical tables as they come") validates and reads the real
    SurvPath CSV with its three endpoints."""
    readme = (repo / "README.md").read_text()
    section = readme[readme.index("**Clinical tables as they come.**") :]
    block = section[section.index("```yaml") + len("```yaml") : section.index("```", section.index("```yaml") + 7)]
    config = yaml.safe_load(block)
    assert config["clinical"].endswith(".csv")
    layout = ClinicalLayout.from_config(validate_config({"survival": config["survival"]}))
    table = read_clinical_table(shared_data / "clinical" / "survpath-tcga_hnsc.csv", layout=layout).table
    raw = pd.read_csv(shared_data / "clinical" / "survpath-tcga_hnsc.csv").drop_duplicates("case_id")
    for endpoint in layout.endpoints:
        events = endpoint_frame(table, endpoint)["event"]
        assert events.sum() == (1 - raw[endpoint.event]).sum() > 0


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["hnsc", "coadread"])
def test_survpath_csv_read_directly_equals_the_converted_table(shared_data: Path, tmp_path: Path, name: str) -> None:
    """Every patient's time and event of every endpoint, read from the CSV as it comes, are those of the table
    `python -m histoclip.survival from-censorship` writes — and event = 1 - censorship of the raw rows."""
    source = shared_data / "clinical" / f"survpath-tcga_{name}.csv"
    raw = pd.read_csv(source)
    several = raw["case_id"].value_counts()
    assert (several > 1).sum() > 0  # patients with several slides: one row per slide
    converted_path = tmp_path / "converted.tsv"
    endpoint_args = ["--endpoint", "dss=survival_months_dss,censorship_dss"]
    endpoint_args += ["--endpoint", "pfi=survival_months_pfi,censorship_pfi"]
    assert main(["from-censorship", str(source), str(converted_path), *endpoint_args]) == 0
    converted = read_clinical_table(converted_path).table  # our own layout: patient_id, time, event
    layout = ClinicalLayout.from_config(survpath_config())
    direct = read_clinical_table(source, layout=layout)
    assert len(direct.table) == raw["case_id"].nunique() == len(converted)
    assert direct.slide_level_columns == ["Unnamed: 0", "slide_id"]
    per_patient = raw.drop_duplicates("case_id").set_index("case_id")
    for endpoint in layout.endpoints:
        suffix = "" if endpoint.name == "os" else f"_{endpoint.name}"
        ours = endpoint_frame(direct.table, endpoint)
        theirs = endpoint_frame(converted, Endpoint(endpoint.name, f"time{suffix}", f"event{suffix}"))
        pd.testing.assert_frame_equal(ours, theirs.loc[ours.index], check_names=False)
        assert set(ours.index) == set(theirs.index)
        np.testing.assert_array_equal(ours["event"], 1 - per_patient.loc[ours.index, endpoint.event])
        np.testing.assert_allclose(ours["time"], per_patient.loc[ours.index, endpoint.time])


@pytest.mark.shared_data
def test_survpath_csv_runs_the_analysis_like_the_converted_table(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "clinical" / "survpath-tcga_hnsc.csv"
    converted = tmp_path / "converted.tsv"
    assert main(["from-censorship", str(source), str(converted)]) == 0
    terms = {"multivariable": ["clinical:age", "clinical:is_female"], "km_groupings": ["clinical:is_female"]}
    direct = run_survival(
        SurvivalInputs(clinical=source),
        SurvivalPlan.from_config(survpath_config(endpoints={"os": SURVPATH_ENDPOINTS["os"]}, **terms)),
    )
    ours = run_survival(
        SurvivalInputs(clinical=converted), SurvivalPlan.from_config(default_config({"survival": terms}))
    )
    columns = ["covariate", "coef", "se", "p", "n", "events", "fitted"]
    pd.testing.assert_frame_equal(direct.multivariable[columns], ours.multivariable[columns])
    assert direct.multivariable["fitted"].all() and direct.multivariable["n"].iloc[0] == 394
    pd.testing.assert_frame_equal(direct.logrank["clinical:is_female"], ours.logrank["clinical:is_female"])
