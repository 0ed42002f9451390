"""The cohort sheet, the clinical table, the prompt sets and the results folder."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from histoclip.errors import InputError
from histoclip.preflight.problems import Problem, problems_from
from histoclip.sheets import SlideRecord, check_cohort_sheet
from histoclip.survival.clinical import ClinicalLayout, read_clinical_table

#: Free space below this in the results folder is worth a warning.
LOW_DISK_BYTES = 2 * 2**30


def check_sheet(path: str | Path) -> tuple[list[SlideRecord], list[Problem]]:
    """The sheet's valid rows and a row per problem (a sheet that cannot be read at all: one row, no records)."""
    try:
        records, errors = check_cohort_sheet(path)
    except InputError as exc:
        return [], problems_from(exc, "sheet")
    problems = [row for error in errors for row in problems_from(error, "sheet")]
    by_file: dict[Path, str] = {}
    for record in records:
        other = by_file.setdefault(record.path, record.slide_id)
        if other != record.slide_id:
            problems.append(
                Problem(
                    "warning",
                    "sheet",
                    f"{path}, slide {record.slide_id!r}",
                    f"slide {record.slide_id!r} points at the same file as slide {other!r} ({record.path})",
                    "check the path column: each slide id should be its own slide file",
                    record.slide_id,
                )
            )
    return records, problems


def check_clinical(
    path: str | Path, records: Sequence[SlideRecord], layout: ClinicalLayout | None = None
) -> list[Problem]:
    """Rows of the clinical table (its columns as ``layout`` names them: the config's survival.patient_column and
    endpoints), ids shared with the sheet, events; one warning per patient without a row."""
    patients = list(dict.fromkeys(record.patient_id for record in records))
    try:
        clinical = read_clinical_table(path, patients if records else None, layout=layout)
    except InputError as exc:
        return problems_from(exc, "clinical")
    problems = []
    for patient in clinical.missing_patients:
        slides = [record.slide_id for record in records if record.patient_id == patient]
        problems.append(
            Problem(
                "warning",
                "clinical",
                f"clinical table {path}",
                f"patient {patient!r} (slides {', '.join(slides)}) has no row: left out of survival analyses",
                "add the patient's row (time, event) or accept that it is left out",
            )
        )
    return problems


PROMPT_SUFFIXES = (".yaml", ".yml", ".json")


def prompt_set_file(entry: str, search_dirs: Sequence[str | Path] = (".",)) -> Path | None:
    """Where ``zeroshot.prompt_sets`` entry ``entry`` is read from (as rules/common.smk resolves it), or None."""
    if entry.endswith(PROMPT_SUFFIXES):
        return Path(entry)
    for suffix in PROMPT_SUFFIXES:
        for folder in search_dirs:
            candidate = Path(folder) / "config" / "prompts" / f"{entry}{suffix}"
            if candidate.exists():
                return candidate
    return None


def check_prompts(
    entries: Sequence[str], records: Sequence[SlideRecord], search_dirs: Sequence[str | Path] = (".",)
) -> list[Problem]:
    """Each prompt set parses and can call slides; labels of the sheet that none of its classes match."""
    from histoclip.zeroshot.prompts import load_prompt_set

    problems = []
    labels: dict[str, int] = {}
    for record in records:
        if record.label:
            labels[record.label] = labels.get(record.label, 0) + 1
    for entry in entries:
        path = prompt_set_file(entry, search_dirs)
        if path is None:
            problems.append(
                Problem(
                    "error",
                    "prompts",
                    f"config zeroshot.prompt_sets: {entry!r}",
                    f"prompt set {entry!r} not found in config/prompts/ (.yaml, .yml or .json)",
                    "add the file or give its path in zeroshot.prompt_sets",
                )
            )
            continue
        try:
            prompt_set = load_prompt_set(path)
        except InputError as exc:
            problems += problems_from(exc, "prompts")
            continue
        if len(prompt_set.called_classes) < 2:
            problems.append(
                Problem(
                    "error",
                    "prompts",
                    str(path),
                    f"prompt set {prompt_set.name!r} has {len(prompt_set.called_classes)} called class(es) "
                    f"{prompt_set.called_classes}; calling a slide needs at least 2",
                    "add classes under `classes:` (background classes are not called)",
                )
            )
        for label, count in labels.items():
            if label not in prompt_set.called_classes:
                problems.append(
                    Problem(
                        "warning",
                        "prompts",
                        str(path),
                        f"label {label!r} ({count} slide(s) of the sheet) is not a class of prompt set "
                        f"{prompt_set.name!r} {prompt_set.called_classes}: those slides are not evaluated",
                        "use the prompt set's class names in the sheet's label column, or pick the matching prompt set",
                    )
                )
    return problems


def check_outputs(results_dir: str | Path) -> list[Problem]:
    """The results folder can be written to, atomically, and has some room."""
    folder = Path(results_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".preflight.", suffix=".tmp"):
            pass
    except OSError as exc:
        return [
            Problem(
                "error",
                "output",
                str(folder),
                f"the results folder cannot be written to: {exc}",
                "run from a folder you can write to (outputs go to results/ in the working directory)",
            )
        ]
    free = shutil.disk_usage(folder).free
    if free < LOW_DISK_BYTES:
        return [
            Problem(
                "warning",
                "output",
                str(folder),
                f"only {free / 2**30:.1f} GiB free where results are written",
                "free some space: embeddings take dim × 2 bytes per tile (float16)",
            )
        ]
    return []
