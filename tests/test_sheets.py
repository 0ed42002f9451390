"""Cohort sheet and clinical table validation: every error names file, line, column and a fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from histoclip.errors import InputError
from histoclip.sheets import read_cohort_sheet


def write(path: Path, rows: list[list[str]], sep: str = "\t") -> Path:
    path.write_text("\n".join(sep.join(r) for r in rows) + "\n")
    return path


@pytest.fixture
def slide_files(tmp_path):
    (tmp_path / "slides").mkdir()
    for name in ("a.svs", "b.svs"):
        (tmp_path / "slides" / name).write_bytes(b"x")
    return tmp_path


def test_valid_sheet_resolves_relative_paths_and_reads_optional_columns(slide_files):
    sheet = write(
        slide_files / "slides.tsv",
        [
            ["slide_id", "patient_id", "path", "mpp", "label", "site"],
            ["A-1", "P1", "slides/a.svs", "0.25", "LUAD", "x"],
            ["B.2", "P2", str(slide_files / "slides" / "b.svs"), "", "", "y"],
        ],
    )
    records = read_cohort_sheet(sheet)
    assert [r.slide_id for r in records] == ["A-1", "B.2"]
    assert records[0].path == (slide_files / "slides" / "a.svs").resolve()
    assert records[0].mpp == 0.25 and records[0].label == "LUAD"
    assert records[1].mpp is None and records[1].label is None
    assert records[1].extra == {"site": "y"}


def test_sheet_relative_to_its_own_folder_not_the_cwd(slide_files, monkeypatch, tmp_path_factory):
    sheet = write(slide_files / "slides.tsv", [["slide_id", "patient_id", "path"], ["a", "P1", "slides/a.svs"]])
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert read_cohort_sheet(sheet)[0].path.exists()


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (["../x", "P1", "slides/a.svs"], ["line 2", "'slide_id'", "../x", "[A-Za-z0-9._-]"]),
        (["a b", "P1", "slides/a.svs"], ["line 2", "'slide_id'", "Fix:"]),
        (["a;rm -rf", "P1", "slides/a.svs"], ["line 2", "'slide_id'"]),
        (["a", "P1", "slides/missing.svs"], ["line 2", "'path'", "missing.svs", "does not exist", "relative"]),
        (["a", "P1", "slides/a.svs", "abc"], ["line 2", "'mpp'", "'abc'", "positive number"]),
        (["a", "P1", "slides/a.svs", "-0.5"], ["line 2", "'mpp'"]),
        (["a", "", "slides/a.svs"], ["line 2", "'patient_id'"]),
    ],
)
def test_bad_rows_name_line_column_and_fix(slide_files, row, expected):
    header = ["slide_id", "patient_id", "path"] + (["mpp"] if len(row) > 3 else [])
    sheet = write(slide_files / "slides.tsv", [header, row])
    with pytest.raises(InputError) as err:
        read_cohort_sheet(sheet)
    message = str(err.value)
    assert str(sheet) in message
    for part in expected:
        assert part in message
    assert "Fix" in message


def test_duplicate_ids_point_at_both_lines(slide_files):
    sheet = write(
        slide_files / "slides.tsv",
        [["slide_id", "patient_id", "path"], ["a", "P1", "slides/a.svs"], ["a", "P2", "slides/b.svs"]],
    )
    with pytest.raises(InputError, match=r"line 3.*duplicate slide id 'a' \(first on line 2\)"):
        read_cohort_sheet(sheet)


def test_all_problems_are_reported_at_once(slide_files):
    sheet = write(
        slide_files / "slides.tsv",
        [["slide_id", "patient_id", "path"], ["../x", "P1", "slides/a.svs"], ["b", "P2", "nope.svs"]],
    )
    with pytest.raises(InputError, match="2 problem"):
        read_cohort_sheet(sheet)


def test_missing_columns_and_wrong_delimiter(slide_files):
    sheet = write(slide_files / "slides.tsv", [["slide_id", "path"], ["a", "slides/a.svs"]])
    with pytest.raises(InputError, match=r"missing required column\(s\) \['patient_id'\]"):
        read_cohort_sheet(sheet)
    comma = write(slide_files / "comma.tsv", [["slide_id", "patient_id", "path"], ["a", "P1", "slides/a.svs"]], ",")
    with pytest.raises(InputError, match="comma-separated"):
        read_cohort_sheet(comma)


def test_csv_by_extension_is_accepted(slide_files):
    sheet = write(slide_files / "slides.csv", [["slide_id", "patient_id", "path"], ["a", "P1", "slides/a.svs"]], ",")
    assert read_cohort_sheet(sheet)[0].slide_id == "a"


def test_empty_and_missing_sheets(tmp_path):
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(InputError, match="empty"):
        read_cohort_sheet(tmp_path / "empty.tsv")
    write(tmp_path / "header.tsv", [["slide_id", "patient_id", "path"]])
    with pytest.raises(InputError, match="no rows"):
        read_cohort_sheet(tmp_path / "header.tsv")
    with pytest.raises(InputError, match="not found"):
        read_cohort_sheet(tmp_path / "absent.tsv")


def test_jobs_can_skip_the_slide_file_check_and_nothing_else(slide_files):
    """What a cluster job does (rules/common.smk): the planning process checked the files; the rows still are."""
    sheet = write(slide_files / "slides.tsv", [["slide_id", "patient_id", "path"], ["a", "P1", "slides/gone.svs"]])
    with pytest.raises(InputError, match="does not exist"):
        read_cohort_sheet(sheet)
    (record,) = read_cohort_sheet(sheet, check_files=False)
    assert record.slide_id == "a" and record.path == slide_files / "slides" / "gone.svs"
    bad = write(slide_files / "bad.tsv", [["slide_id", "patient_id", "path"], ["../a", "P1", "slides/gone.svs"]])
    with pytest.raises(InputError, match="line 2"):
        read_cohort_sheet(bad, check_files=False)
