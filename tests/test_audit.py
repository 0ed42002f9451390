"""Site audit on small synthetic cohorts whose site effect is known: found when there, not found when not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from histoclip.audit.site import AuditSettings, SiteAuditInputs, run_site_audit
from histoclip.audit.sites import site_column, tcga_site
from histoclip.config import default_config
from histoclip.errors import InputError
from histoclip.formats import vectors_column, write_slide_embeddings

SETTINGS = AuditSettings.from_config(default_config({"audit": {"permutations": 30, "n_bootstrap": 200}}))


def cohort(root, *, site_effect: float, n_patients: int = 60, dim: int = 32, seed: int = 0):
    """Slide embeddings = subtype direction + noise, plus a fixed stain-like shift on site-B slides (``site_effect``
    in units of the noise's standard deviation per dimension); every fifth patient has two slides."""
    rng = np.random.default_rng(seed)
    subtype_axis, site_axis = rng.normal(0, 1, (2, dim))
    site_axis /= np.linalg.norm(site_axis) / np.sqrt(dim)
    rows, vectors = [], []
    for p in range(n_patients):
        label, site = "ab"[p % 2], ["site-A", "site-B"][(p // 2) % 2]
        for s in range(2 if p % 5 == 0 else 1):
            v = rng.normal(0, 1, dim) + (2 if label == "b" else -2) * subtype_axis / np.sqrt(dim)
            v = v + (site_effect * site_axis if site == "site-B" else 0)
            vectors.append(v / np.linalg.norm(v))
            rows.append(
                {"slide_id": f"P{p:02d}-{s}", "patient_id": f"P{p:02d}", "path": "x.svs", "label": label, "site": site}
            )
    sheet = pd.DataFrame(rows)
    (root / "x.svs").write_bytes(b"")
    sheet.to_csv(root / "slides.tsv", sep="\t", index=False)
    table = pa.table(
        {
            "slide_id": sheet["slide_id"],
            "patient_id": sheet["patient_id"],
            "n_tiles": [50] * len(sheet),
            "embedding": vectors_column(vectors, dim),
        }
    )
    write_slide_embeddings(root / "slides.parquet", table, {})
    return sheet


def prediction(table: pd.DataFrame) -> pd.Series:
    return table[(table["analysis"] == "site_prediction") & (table["quantity"] == "balanced_accuracy")].iloc[0]


def test_a_stain_shift_at_one_site_is_found(tmp_path):
    cohort(tmp_path, site_effect=0.5)
    table, facts = run_site_audit(SiteAuditInputs(tmp_path / "slides.tsv", tmp_path / "slides.parquet"), SETTINGS)
    row = prediction(table)
    assert row["reference"] == 0.5 and row["n"] == 72
    # measured 0.78 (0.69-0.87), p = 1/31
    assert row["value"] >= 0.7 and row["lower_95"] > 0.6 and row["p_value"] <= 0.05
    assert len(facts["prediction"]["null"]) == 30 and max(facts["prediction"]["null"]) < row["value"]


def test_no_site_effect_no_finding(tmp_path):
    cohort(tmp_path, site_effect=0.0)
    table, _ = run_site_audit(SiteAuditInputs(tmp_path / "slides.tsv", tmp_path / "slides.parquet"), SETTINGS)
    row = prediction(table)
    assert row["value"] < 0.7 and row["lower_95"] < 0.5 < row["upper_95"] and row["p_value"] > 0.05


def test_clusters_phenotypes_calls_and_cox_against_site(tmp_path):
    sheet = cohort(tmp_path, site_effect=0.5)
    # clusters that are the sites, compositions that ignore them, calls that are the labels
    sheet.assign(cluster=sheet["site"].map({"site-A": 0, "site-B": 1}))[["slide_id", "cluster"]].to_csv(
        tmp_path / "clusters.tsv", sep="\t", index=False
    )
    rng = np.random.default_rng(1)
    fractions = rng.dirichlet([2, 2, 2], len(sheet))
    pd.DataFrame(
        {
            "slide_id": sheet["slide_id"],
            "patient_id": sheet["patient_id"],
            "n_tiles": 50,
            **{f"phenotype_{i:02d}": fractions[:, i] for i in range(3)},
        }
    ).to_csv(tmp_path / "composition.tsv", sep="\t", index=False)
    sheet.assign(call=sheet["label"], p_a=0.5, p_b=0.5)[["slide_id", "call", "p_a", "p_b"]].to_csv(
        tmp_path / "calls.tsv", sep="\t", index=False
    )
    patients = sheet.drop_duplicates("patient_id")
    n = len(patients)
    age = rng.normal(60, 10, n)
    time = rng.exponential(10 / np.exp(0.05 * (age - 60)))
    pd.DataFrame({"patient_id": patients["patient_id"], "time_os": time, "event_os": 1, "clinical:age": age}).to_csv(
        tmp_path / "patients.tsv", sep="\t", index=False
    )
    pd.DataFrame({"endpoint": ["os"], "covariate": ["clinical:age"], "fitted": [True]}).to_csv(
        tmp_path / "cox.tsv", sep="\t", index=False
    )
    inputs = SiteAuditInputs(
        tmp_path / "slides.tsv",
        tmp_path / "slides.parquet",
        tmp_path / "clusters.tsv",
        tmp_path / "composition.tsv",
        tmp_path / "calls.tsv",
        tmp_path / "patients.tsv",
        tmp_path / "cox.tsv",
    )
    table, facts = run_site_audit(inputs, SETTINGS)
    from histoclip.audit.site import plot_site_audit
    from histoclip.plots import FigureStyle

    written = plot_site_audit(table, facts, tmp_path / "site", FigureStyle.from_config(default_config()), title="t")
    assert all(p.stat().st_size for p in written) and len(written) == 3
    by = table.set_index(["analysis", "quantity", "group"])
    clusters = by.loc[("slide_clusters", "adjusted_rand_index", "")]
    assert clusters["value"] == pytest.approx(1.0) and clusters["p_value"] <= 0.05
    phenotypes = by.loc[("phenotype_composition", "adjusted_rand_index", "")]
    assert abs(phenotypes["value"]) < 0.1 and phenotypes["p_value"] > 0.05
    shares = table[(table["analysis"] == "calls_per_site") & (table["quantity"] != "chi_square")]
    assert len(shares) == 4 and shares.groupby("group")["value"].sum().tolist() == pytest.approx([1.0, 1.0])
    assert by.loc[("calls_per_site", "chi_square", ""), "p_value"] > 0.05  # labels alternate with site
    cox = by.loc[("cox_stratified_by_site", "clinical:age", "os")]
    assert cox["lower_95"] <= cox["value"] <= cox["upper_95"] and cox["n"] == n
    assert cox["reference"] == pytest.approx(cox["value"], rel=0.1)  # age is not confounded with site here
    # a multivariable model that was not fitted is said to be so, not silently skipped
    pd.DataFrame({"endpoint": ["os"], "covariate": ["clinical:age"], "fitted": [False]}).to_csv(
        tmp_path / "cox.tsv", sep="\t", index=False
    )
    table, _ = run_site_audit(inputs, SETTINGS)
    row = table[table["analysis"] == "cox_stratified_by_site"].iloc[0]
    assert row["quantity"] == "not fitted" and "was not fitted" in row["note"]


def test_sites_from_a_column_or_from_tcga_barcodes():
    assert tcga_site("TCGA-05-4244-01Z-00-DX1") == "05" and tcga_site("slide1", "tcga-ab-1234") == "AB"
    assert tcga_site("slide1", "P1") is None
    sheet = pd.DataFrame({"slide_id": ["TCGA-05-4244-01Z", "s2"], "patient_id": ["TCGA-05-4244", "TCGA-A7-0001"]})
    assert site_column(sheet, site_from="tcga_barcode", column="site", where="s").tolist() == ["05", "A7"]
    bad = pd.DataFrame({"slide_id": ["a1"], "patient_id": ["p1"]})
    with pytest.raises(InputError, match=r"sheet.tsv: 1 slide\(s\) have neither .* e.g. 'a1'"):
        site_column(bad, site_from="tcga_barcode", column="site", where="sheet.tsv")
    with pytest.raises(InputError, match="sheet.tsv: has no column 'hospital'.*audit.site_from: tcga_barcode"):
        site_column(bad, site_from="column", column="hospital", where="sheet.tsv")
