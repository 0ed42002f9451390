"""Preflight: check a cohort before any GPU time is spent on it.

A cohort run takes hours to days; a slide that cannot be opened, a sheet row pointing nowhere, an mpp that
cannot be resolved or a model whose weights are missing should cost seconds, not a failed job at hour ten.
The preflight does the cheap version of everything the run will do, for every slide, and writes **one line
per problem** (``severity``, ``what``, ``slide_id``, ``where``, ``problem``, ``fix``):

- ``config``: validated against the schema (unknown keys, wrong types);
- ``sheet``: every row of the cohort sheet (ids, paths, mpp), plus slides sharing one file;
- ``clinical``: rows, ids shared with the sheet, at least one event; patients without a row (warnings);
- ``slide``: each slide opened by the run's readers (OpenSlide first; the reader is recorded), its mpp resolved
  by the run's policy (histoclip.tiling.slide), the pyramid level tissue detection will read sized, and one
  tile read at the level tiling will read and one at
  the tissue level (both decoded), with a truncated file told apart from a corrupt one;
- ``prompts``: each prompt set parsed and validated, two or more called classes, sheet labels that are not
  classes of it (they will not be evaluated);
- ``model``: each model of ``embedding.models`` has its weights on disk (or in the Hugging Face cache), a
  checkpoint is safetensors or a plain tensor pickle (never unpickled as code), and its tensor names and
  shapes fit the architecture — compared from the file's header with the architecture built on PyTorch's
  ``meta`` device, so no weight is loaded and no GPU is touched;
- ``output``: the results folder can be written to and has space.

Severities: ``error`` (the run would fail: fix it first), ``skip`` (the slide would fail, but
``on_slide_error: record`` records it and the run goes on) and ``warning``. What the preflight cannot see:
damage in tiles it does not read, and whether tissue is found (that needs a tissue mask, which tiling makes).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from histoclip.config import default_config, fill_defaults, load_schema, validate_config
from histoclip.embedding.backends.checkpoints import checkpoint_shapes
from histoclip.embedding.backends.open_clip_backend import architecture_shapes, fit_problems
from histoclip.errors import InputError
from histoclip.preflight.inputs import check_clinical, check_outputs, check_prompts, check_sheet, prompt_set_file
from histoclip.preflight.models import check_model
from histoclip.preflight.problems import COLUMNS, SEVERITIES, SUBJECTS, Problem, problems_from
from histoclip.preflight.report import PreflightReport, describe, write_report
from histoclip.preflight.slides import SLIDE_COLUMNS, SlideCheck, SlideSettings, check_slide, check_slides
from histoclip.sheets import SlideRecord
from histoclip.survival.clinical import ClinicalLayout

__all__ = [
    "COLUMNS",
    "SEVERITIES",
    "SLIDE_COLUMNS",
    "SUBJECTS",
    "PreflightReport",
    "Problem",
    "SlideCheck",
    "SlideSettings",
    "architecture_shapes",
    "check_clinical",
    "check_model",
    "check_outputs",
    "check_prompts",
    "check_sheet",
    "check_slide",
    "check_slides",
    "checkpoint_shapes",
    "describe",
    "fit_problems",
    "problems_from",
    "prompt_set_file",
    "run_preflight",
    "write_report",
]


def run_preflight(
    config: Mapping[str, Any],
    *,
    search_dirs: Sequence[str | Path] = (".",),
    threads: int | None = None,
    results_dir: str | Path = "results",
    source: str = "config",
) -> PreflightReport:
    """Check everything a run of ``config`` reads, before it runs; never raises for bad input."""
    started = time.perf_counter()
    problems: list[Problem] = []
    try:
        config = validate_config(config, source=source)
    except InputError as exc:
        problems += problems_from(exc, "config")
        config = fill_defaults(dict(config), load_schema())
        if str(config.get("clinical")).strip().lower() in ("", "null", "none"):
            config["clinical"] = None  # as validate_config reads `--config clinical=null`
    problems += check_outputs(results_dir)

    def guarded(what: str, check: Any, *args: Any) -> Any:
        try:
            return check(*args)
        except Exception as exc:  # a config so broken that a check cannot even start
            problems.append(Problem("error", what, source, f"could not be checked: {exc!r}", "fix the config first"))
            return None

    sheet = config.get("slides")
    records: list[SlideRecord] = []
    if isinstance(sheet, str):
        checked = guarded("sheet", check_sheet, sheet)
        if checked:
            records, sheet_problems = checked
            problems += sheet_problems
    clinical = config.get("clinical")
    if isinstance(clinical, str):
        try:  # the survival config names the clinical table's columns (and their coding is checked here)
            layout = ClinicalLayout.from_config(config)
        except InputError as exc:
            problems += problems_from(exc, "config")
        else:
            problems += guarded("clinical", check_clinical, clinical, records, layout) or []
    prompt_sets = (config.get("zeroshot") or {}).get("prompt_sets") or []
    problems += guarded("prompts", check_prompts, list(prompt_sets), records, search_dirs) or []
    models = config.get("models") or {}
    for name in (config.get("embedding") or {}).get("models") or []:
        if name in models and isinstance(models[name], Mapping):
            problems += guarded("model", check_model, name, models[name], config, search_dirs) or []

    slide_started = time.perf_counter()
    checks: list[SlideCheck] = []
    if records:
        checks = check_slides(records, _slide_settings(config), threads)
        problems += [problem for check in checks for problem in check.problems]
    slide_seconds = time.perf_counter() - slide_started
    return PreflightReport(problems, checks, time.perf_counter() - started, slide_seconds)


def _slide_settings(config: Mapping[str, Any]) -> SlideSettings:
    """The tile rule's settings from ``config``; where those keys are invalid (the config check has said so),
    the schema's defaults, so that the slides are still checked."""
    part = {key: config[key] for key in ("tiling", "tissue", "mpp", "on_slide_error") if key in config}
    try:
        return SlideSettings.from_config(default_config(part))
    except InputError:
        return SlideSettings.from_config(default_config())
