"""Preflight: check a cohort before any GPU time is spent on it.

A cohort run takes hours to days; a slide that cannot be opened, a sheet row pointing nowhere, an mpp that
cannot be resolved or a model whose weights are missing should cost seconds, not a failed job at hour ten.
The preflight does the cheap version of everything the run will do, for every slide, and writes **one line
per problem** (``severity``, ``what``, ``slide_id``, ``where``, ``problem``, ``fix``):

- ``config``: validated against the schema (unknown keys, wrong types);
- ``sheet``: every row of the cohort sheet (ids, paths, mpp), plus slides sharing one file;
- ``clinical``: rows, ids shared with the sheet, at least one event; patients without a row (warnings);
- ``slide``: each slide opened with OpenSlide, its mpp resolved by the run's policy (histoclip.tiling.slide), the
  pyramid level tissue detection will read sized, and one tile read at the level tiling will read and one at
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

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from histoclip.config import _fill_defaults, load_schema, validate_config
from histoclip.errors import InputError, InputErrors, SlideError
from histoclip.sheets import SlideRecord, check_cohort_sheet, read_clinical_table
from histoclip.tiling import slide as wsi

log = logging.getLogger(__name__)

#: Columns of the preflight table, in order.
COLUMNS = ("severity", "what", "slide_id", "where", "problem", "fix")
#: Severities, most serious first (the table's sort order).
SEVERITIES = ("error", "skip", "warning")
#: What a problem is about, in the table's sort order.
SUBJECTS = ("config", "output", "sheet", "clinical", "prompts", "model", "slide")
#: Columns of the per-slide table.
SLIDE_COLUMNS = (
    "slide_id",
    "status",
    "path",
    "vendor",
    "level_count",
    "level0_width",
    "level0_height",
    "level0_mpp",
    "mpp_source",
    "read_level",
    "tissue_level",
    "tissue_level_mb",
    "seconds",
)
#: A level read whole (tissue detection) larger than this (RGBA bytes) is worth a warning about memory.
LARGE_LEVEL_BYTES = 256 * 2**20
#: Free space below this in the results folder is worth a warning.
LOW_DISK_BYTES = 2 * 2**30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Problem:
    """One line of the preflight table."""

    severity: str
    what: str
    where: str
    problem: str
    fix: str = ""
    slide_id: str = ""


def problems_from(error: InputError, what: str, *, severity: str = "error", slide_id: str = "") -> list[Problem]:
    """The rows of an :class:`InputError` (one per problem of an :class:`InputErrors`)."""
    items = error.problems if isinstance(error, InputErrors) else [error]
    rows = []
    for item in items:
        where = item.where or (error.where or "")
        rows.append(Problem(severity, what, where, item.problem.strip(), (item.fix or "").strip(), slide_id))
    return rows


# --- slides ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideSettings:
    """What the run will do to each slide, from the validated config."""

    target_mpp: float = 0.5
    tile_px: int = 224
    tissue_mpp: float = 8.0
    plausible: wsi.MppRange = wsi.MppRange()
    on_slide_error: str = "fail"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SlideSettings:
        return cls(
            target_mpp=float(config["tiling"]["target_mpp"]),
            tile_px=int(config["tiling"]["tile_px"]),
            tissue_mpp=float(config["tissue"]["mpp"]),
            plausible=wsi.MppRange(float(config["mpp"]["min"]), float(config["mpp"]["max"])),
            on_slide_error=str(config["on_slide_error"]),
        )

    @property
    def slide_severity(self) -> str:
        return "skip" if self.on_slide_error == "record" else "error"


@dataclass
class SlideCheck:
    """What the preflight learnt about one slide (a row of the per-slide table)."""

    slide_id: str
    path: str
    status: str = "ok"
    vendor: str = ""
    level_count: int = 0
    level0_width: int = 0
    level0_height: int = 0
    level0_mpp: float = math.nan
    mpp_source: str = ""
    read_level: int = -1
    tissue_level: int = -1
    tissue_level_mb: float = math.nan
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)


def _read_region(slide: Any, slide_id: str, path: Path, level: int, location: tuple[int, int], size: int) -> None:
    """Decode one region; a failure becomes a SlideError that says truncated or corrupt."""
    import openslide

    try:
        wsi.read_rgb(slide, location, level, (size, size))
    except openslide.OpenSlideError as exc:
        truncated = wsi.tiff_truncation(path)
        if truncated is not None:
            raise wsi.truncated_slide_error(slide_id, path, truncated) from exc
        raise SlideError(
            slide_id,
            f"pixel data at level {level}, level-0 x={location[0]}, y={location[1]} cannot be decoded: {exc}",
            fix="the file is corrupt; re-export or re-scan it, or remove it from the sheet",
        ) from exc


def _one_stored_tile(slide: Any, level: int, location: tuple[int, int], size: int) -> tuple[tuple[int, int], int]:
    """Move a region onto the file's own tile grid (when OpenSlide reports it) and fit it in one stored tile, so
    that checking it costs one decode, not up to four."""
    downsample = slide.level_downsamples[level]
    width, height = slide.level_dimensions[level]
    try:
        tile_w = int(slide.properties[f"openslide.level[{level}].tile-width"])
        tile_h = int(slide.properties[f"openslide.level[{level}].tile-height"])
    except (KeyError, ValueError):
        tile_w = tile_h = size
    x = min(max(0, int(location[0] / downsample)), max(0, width - 1))
    y = min(max(0, int(location[1] / downsample)), max(0, height - 1))
    x, y = x - x % tile_w, y - y % tile_h
    size = max(1, min(size, tile_w, tile_h, width - x, height - y))
    return (round(x * downsample), round(y * downsample)), size


def check_slide(record: SlideRecord, settings: SlideSettings = SlideSettings()) -> SlideCheck:
    """Open one slide, resolve its mpp, size the level tissue detection reads, and decode two tiles.

    Every problem is recorded on the returned :class:`SlideCheck`, never raised: one odd file must not stop the
    check of the thousands after it.
    """
    try:
        return _check_slide(record, settings)
    except Exception as exc:  # anything OpenSlide or a vendor format throws that the checks above don't name
        check = SlideCheck(record.slide_id, str(record.path), status=settings.slide_severity)
        problem = f"could not be checked: {type(exc).__name__}: {exc}"
        fix = "open the file with OpenSlide by hand to see what is wrong, or remove it from the sheet"
        where = f"slide {record.slide_id!r} ({record.path})"
        check.problems.append(Problem(settings.slide_severity, "slide", where, problem, fix, record.slide_id))
        return check


def _check_slide(record: SlideRecord, settings: SlideSettings) -> SlideCheck:
    started = time.perf_counter()
    check = SlideCheck(record.slide_id, str(record.path))
    where = f"slide {record.slide_id!r} ({record.path})"

    def add(severity: str, problem: str, fix: str = "") -> None:
        check.problems.append(Problem(severity, "slide", where, problem, fix, record.slide_id))

    def failed(error: SlideError) -> SlideCheck:
        check.status = settings.slide_severity
        fix = error.fix or ""
        if settings.on_slide_error == "record":
            fix = f"{fix} (on_slide_error: record, so the run records this slide as failed and goes on)".strip()
        add(settings.slide_severity, error.problem, fix)
        check.seconds = time.perf_counter() - started
        return check

    try:
        slide = wsi.open_wsi(record.path, record.slide_id)
    except SlideError as exc:
        return failed(exc)
    with slide:
        check.vendor = slide.properties.get("openslide.vendor", "unknown")
        check.level_count = slide.level_count
        check.level0_width, check.level0_height = slide.dimensions
        try:
            resolved = wsi.resolve_mpp(slide, record.path, record.slide_id, record.mpp, settings.plausible)
        except SlideError as exc:
            return failed(exc)
        check.level0_mpp, check.mpp_source = resolved.mpp, resolved.source
        for warning in resolved.warnings:
            fix = "add this slide's mpp to the sheet's 'mpp' column" if "objective power" in warning else ""
            add("warning", warning, fix)
        for warning in wsi.check_target(resolved.mpp, settings.target_mpp, record.slide_id):
            add("warning", warning, "accept upsampled tiles, or set tiling.target_mpp to at least the scan's mpp")

        tissue_level = wsi.nearest_level(slide, resolved.mpp, settings.tissue_mpp)
        width, height = slide.level_dimensions[tissue_level]
        check.tissue_level = tissue_level
        check.tissue_level_mb = width * height * 4 / 2**20
        if width * height * 4 > LARGE_LEVEL_BYTES:
            pyramid = "has no pyramid" if slide.level_count == 1 else "has no pyramid level near tissue.mpp"
            add(
                "warning",
                f"{pyramid} ({settings.tissue_mpp} µm/px): tissue detection reads level {tissue_level} whole "
                f"({width}×{height} px, {width * height * 4 / 2**30:.1f} GiB in memory)",
                "convert it to a pyramidal tiled TIFF (vips tiffsave --tile --pyramid) or give the tile rule "
                "more memory (resources: mem_mb)",
            )

        read_level = wsi.read_level_for(slide, resolved.mpp, settings.target_mpp)
        check.read_level = read_level
        tile_level0 = max(1, round(settings.tile_px * settings.target_mpp / resolved.mpp))
        read_px = max(1, math.ceil(tile_level0 / slide.level_downsamples[read_level] - 1e-6))
        centre = ((check.level0_width - tile_level0) // 2, (check.level0_height - tile_level0) // 2)
        try:  # a tile where tiling's tiles are read, and one of the level tissue detection reads whole
            reads = [(read_level, centre, read_px)]
            if tissue_level != read_level:
                reads.append((tissue_level, (0, 0), 256))
            for level, location, size in reads:
                location, size = _one_stored_tile(slide, level, location, size)
                _read_region(slide, record.slide_id, record.path, level, location, size)
        except SlideError as exc:
            return failed(exc)
    check.seconds = time.perf_counter() - started
    return check


def check_slides(
    records: Sequence[SlideRecord], settings: SlideSettings = SlideSettings(), threads: int | None = None
) -> list[SlideCheck]:
    """:func:`check_slide` for every record, in sheet order, on ``threads`` threads (OpenSlide's C calls
    release the GIL, so threads overlap the file reads and decoding)."""
    threads = max(1, threads or os.cpu_count() or 1)
    if threads == 1 or len(records) < 2:
        return [check_slide(record, settings) for record in records]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda record: check_slide(record, settings), records))


# --- sheet, clinical table, prompts --------------------------------------------------------------------------------


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


def check_clinical(path: str | Path, records: Sequence[SlideRecord]) -> list[Problem]:
    """Rows of the clinical table, ids shared with the sheet, events; one warning per patient without a row."""
    patients = list(dict.fromkeys(record.patient_id for record in records))
    try:
        clinical = read_clinical_table(path, patients if records else None)
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


# --- models --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """open_clip warns on the root logger about random init when it builds the architecture for the check."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, without loading its values where the format allows.

    safetensors: the header only. ``.pt``/``.bin``: ``torch.load(weights_only=True, mmap=True)``, which refuses
    any pickled object that is not a tensor or a container of tensors (:class:`pickle.UnpicklingError`).
    open_clip's unwrapping is mirrored: a ``state_dict`` entry, a ``module.`` prefix.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip checkpoint (legacy format): no mmap, still weights_only
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"holds a {type(checkpoint).__name__}, not a state dict")
    shapes = {str(k): tuple(v.shape) for k, v in checkpoint.items() if hasattr(v, "shape")}
    if shapes and next(iter(shapes)).startswith("module"):
        shapes = {k[7:]: v for k, v in shapes.items()}
    return shapes


def architecture_shapes(model_name: str, image_size: int | None = None) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Parameter names and shapes of an open_clip architecture, built on the ``meta`` device (no memory, no
    weights), and whether it has a custom text tower (whose checkpoints open_clip renames)."""
    import open_clip
    import torch

    with _quiet(), torch.device("meta"):
        model = open_clip.create_model(
            model_name, pretrained=None, device="meta", force_image_size=image_size, weights_only=True
        )
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, not hasattr(model, "positional_embedding")


def fit_problems(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Differences between an architecture and a checkpoint that open_clip's strict load would refuse.

    Positional embeddings are left out: open_clip resizes them to the model's image size and context length.
    """
    ignored_missing = {"logit_bias"}
    ignored_unexpected = {"text.transformer.embeddings.position_ids"}
    missing = [k for k in expected if k not in found and k not in ignored_missing]
    unexpected = [k for k in found if k not in expected and k not in ignored_unexpected]
    shapes = [
        f"{k}: {list(found[k])} in the file, {list(expected[k])} in the model"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k]) and not k.endswith("positional_embedding")
    ]
    out = []
    if missing:
        out.append(f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        out.append(f"{len(shapes)} shape mismatch(es) (e.g. {'; '.join(shapes[:3])})")
    return out


def _model_problem(name: str, problem: str, fix: str, severity: str = "error", key: str = "") -> Problem:
    return Problem(severity, "model", f"config models.{name}{'.' + key if key else ''}", problem, fix)


def _check_weights_fit(spec: Any, model_name: str, weights: Path) -> list[Problem]:
    """Read the checkpoint's names and shapes and compare them with the architecture's."""
    import pickle

    from histoclip.embedding.models import unsafe_checkpoint_error

    try:
        found = checkpoint_shapes(weights)
    except pickle.UnpicklingError as exc:
        return problems_from(unsafe_checkpoint_error(spec, str(weights), exc), "model")
    except Exception as exc:  # damaged, empty, or not a checkpoint at all
        return [
            _model_problem(
                spec.name,
                f"the weights file {weights} cannot be read as a checkpoint: {exc}",
                "copy the file again (it may be truncated) or point the model at the right file",
            )
        ]
    if any(k.startswith("image_encoder.model.") for k in found):  # MobileCLIP: open_clip converts it on load
        return []
    try:
        expected, custom_text = architecture_shapes(model_name, spec.image_size)
    except Exception as exc:
        return [
            _model_problem(
                spec.name, f"open_clip cannot build architecture {model_name!r}: {exc}", "check `model` (see README)"
            )
        ]
    if custom_text and "positional_embedding" in found:
        from open_clip.model import convert_to_custom_text_state_dict

        found = convert_to_custom_text_state_dict(dict(found))
    differences = fit_problems(expected, found)
    if not differences:
        return []
    return [
        _model_problem(
            spec.name,
            f"the weights {weights} do not fit the architecture of model {spec.name!r} ({spec.model}): "
            + "; ".join(differences),
            "pair the checkpoint with the model config it was trained with",
        )
    ]


def check_model(
    name: str, entry: Mapping[str, Any], config: Mapping[str, Any], search_dirs: Sequence[str | Path] = (".",)
) -> list[Problem]:
    """Weights present (offline) and fitting the architecture; nothing is loaded onto any device."""
    from histoclip.embedding.models import ModelSpec, _register_json_config

    spec = ModelSpec.from_config(name, entry, search_dirs)
    raw = str(entry["model"])
    trained = {f"local-dir:results/models/{t}" for t in config.get("training", {})}
    if raw in trained:
        folder = Path(spec.model[len("local-dir:") :])
        if not (folder / "open_clip_model.safetensors").exists():
            return check_training(raw[len("local-dir:results/models/") :], config, search_dirs)
    try:
        if spec.model.startswith("local-dir:"):
            folder = Path(spec.model[len("local-dir:") :])
            model_config = folder / "open_clip_config.json"
            if not model_config.is_file():
                return [_model_problem(name, f"{model_config} does not exist", _SUPPLY, key="model")]
            weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
            if not weights:
                return [_model_problem(name, f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) in {folder}", _SUPPLY)]
            chosen = next((p for p in weights if p.suffix == ".safetensors"), weights[0])
            model_name = _register_json_config(model_config, spec)
            return _check_weights_fit(spec, model_name, chosen)
        if spec.model.startswith("hf-hub:"):
            from histoclip.embedding.models import _hub_weights_file, hub_offline

            with hub_offline(True):
                found = _hub_weights_file(spec.model[len("hf-hub:") :])
            if found is None:
                return [_model_problem(name, f"{spec.model} is not in the Hugging Face cache (HF_HOME)", _SUPPLY)]
            return []
        model_name = spec.model
        if spec.model.endswith(".json"):
            model_name = _register_json_config(Path(spec.model), spec)
        pretrained = spec.pretrained
        if pretrained and Path(pretrained).suffix in WEIGHT_SUFFIXES:
            if not Path(pretrained).is_file():
                return [_model_problem(name, f"checkpoint {pretrained} does not exist", _SUPPLY, key="pretrained")]
            return _check_weights_fit(spec, model_name, Path(pretrained))
        if pretrained:
            return _check_pretrained_tag(name, model_name, pretrained)
        if spec.model.endswith(".json"):
            return [
                _model_problem(
                    name,
                    f"no weights: {spec.model} is randomly initialised (seed {spec.seed}), meant for tests only",
                    "set `pretrained` to a checkpoint, or use a trained model",
                    severity="warning",
                )
            ]
        return [
            _model_problem(
                name,
                f"{spec.model} has no `pretrained` weights: it would be randomly initialised",
                "set `pretrained` to a tag or checkpoint file",
            )
        ]
    except InputError as exc:
        return problems_from(exc, "model")


_SUPPLY = (
    "supply the weights locally: `pretrained` = a checkpoint file (.safetensors or .pt), or `model` = "
    "local-dir:/path (open_clip_config.json + open_clip_model.safetensors), or the hub files in the Hugging Face "
    "cache (HF_HOME; `huggingface-cli download ORG/REPO` where there is internet)"
)


def _check_pretrained_tag(name: str, model_name: str, tag: str) -> list[Problem]:
    """A built-in pretrained tag (e.g. ``openai``): is its file in the local cache?"""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    if model_name not in open_clip.list_models():
        return [_model_problem(name, f"{model_name!r} is not an open_clip architecture", "check `model`", key="model")]
    cfg = get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = [t for m, t in open_clip.list_pretrained() if m == model_name]
        return [
            _model_problem(name, f"no pretrained tag {tag!r} for {model_name} (has {tags})", _SUPPLY, key="pretrained")
        ]
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        parts = hub.strip("/").split("/")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "open_clip_pytorch_model.bin"
        for candidate in (filename, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, candidate), str):
                return []
        return [_model_problem(name, f"pretrained {tag!r} ({hub}) is not in the Hugging Face cache", _SUPPLY)]
    url = cfg.get("url", "")
    cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url) if url else None
    if cached is None or not cached.exists():
        return [_model_problem(name, f"pretrained {tag!r} ({url or 'no url'}) is not in the local cache", _SUPPLY)]
    return []


def check_training(trained: str, config: Mapping[str, Any], search_dirs: Sequence[str | Path]) -> list[Problem]:
    """A model the workflow trains itself (``training.<name>``): its base and pairs must be there or be made."""
    entry = config["training"][trained]
    problems = []
    base = str(entry["base"])
    base_file = Path(base).is_file() or any((Path(folder) / base).is_file() for folder in search_dirs)
    if base not in config.get("models", {}) and not base_file:
        problems.append(
            Problem(
                "error",
                "model",
                f"config training.{trained}.base",
                f"base {base!r} is neither a name under `models` nor an existing JSON model config",
                "give a `models` name (fine-tuning) or the path of an open_clip model config JSON",
            )
        )
    pairs = str(entry["pairs"])
    if not Path(pairs).exists() and not pairs.startswith("results/"):
        problems.append(
            Problem(
                "error",
                "model",
                f"config training.{trained}.pairs",
                f"pair table {pairs} does not exist",
                "give the TSV of image–caption pairs (see README, Training a CLIP)",
            )
        )
    return problems


# --- config, outputs, the whole preflight --------------------------------------------------------------------------


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


@dataclass
class PreflightReport:
    """Every problem found, the per-slide checks, and how long it took."""

    problems: list[Problem]
    slides: list[SlideCheck]
    seconds: float
    slide_seconds: float = 0.0

    def count(self, severity: str) -> int:
        return sum(problem.severity == severity for problem in self.problems)

    @property
    def ok(self) -> bool:
        return self.count("error") == 0

    def table(self) -> pd.DataFrame:
        """One row per problem, errors first, then by subject, in the order found."""
        rows = [asdict(problem) for problem in self.problems]
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        if frame.empty:
            return frame
        frame["_s"] = frame["severity"].map(SEVERITIES.index)
        frame["_w"] = frame["what"].map(lambda w: SUBJECTS.index(w) if w in SUBJECTS else len(SUBJECTS))
        frame = frame.sort_values(["_s", "_w"], kind="stable").drop(columns=["_s", "_w"])
        return frame.reset_index(drop=True)

    def slide_table(self) -> pd.DataFrame:
        return pd.DataFrame(
            [{column: getattr(check, column) for column in SLIDE_COLUMNS} for check in self.slides],
            columns=list(SLIDE_COLUMNS),
        )

    def summary(self) -> str:
        per_thousand = self.slide_seconds / len(self.slides) * 1000 if self.slides else 0.0
        return (
            f"preflight: {len(self.slides)} slide(s) checked in {self.slide_seconds:.1f} s "
            f"({per_thousand:.1f} s per 1,000 slides), {self.seconds:.1f} s in all: "
            f"{self.count('error')} error(s), {self.count('skip')} slide(s) to be skipped, "
            f"{self.count('warning')} warning(s)"
        )


def _clean(value: Any) -> Any:
    return " ".join(value.split()) if isinstance(value, str) else value


def write_report(report: PreflightReport, table_path: str | Path, slides_path: str | Path | None = None) -> None:
    """The problem table (and the per-slide table) as TSV, written atomically; one line per problem."""
    from histoclip.store import write_text_atomic

    table = report.table().map(_clean)
    write_text_atomic(table_path, table.to_csv(sep="\t", index=False))
    if slides_path is not None:
        slides = report.slide_table().map(_clean)
        write_text_atomic(slides_path, slides.to_csv(sep="\t", index=False, float_format="%.6g"))


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
        config = _fill_defaults(dict(config), load_schema())
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
        problems += guarded("clinical", check_clinical, clinical, records) or []
    prompt_sets = (config.get("zeroshot") or {}).get("prompt_sets") or []
    problems += guarded("prompts", check_prompts, list(prompt_sets), records, search_dirs) or []
    models = config.get("models") or {}
    for name in (config.get("embedding") or {}).get("models") or []:
        if name in models and isinstance(models[name], Mapping):
            problems += guarded("model", check_model, name, models[name], config, search_dirs) or []

    slide_started = time.perf_counter()
    checks: list[SlideCheck] = []
    try:
        settings = SlideSettings.from_config(config)
    except (KeyError, TypeError, ValueError):
        settings = SlideSettings()
    if records:
        checks = check_slides(records, settings, threads)
        problems += [problem for check in checks for problem in check.problems]
    slide_seconds = time.perf_counter() - slide_started
    return PreflightReport(problems, checks, time.perf_counter() - started, slide_seconds)


def describe(report: PreflightReport, table_path: str | Path | None = None, limit: int = 20) -> str:
    """The summary line and the first ``limit`` errors, for a terminal or a log."""
    lines = [report.summary()]
    if table_path is not None:
        lines.append(f"one line per problem in {table_path}")
    table = report.table()
    shown = table[table["severity"] != "warning"].head(limit) if not table.empty else table
    for row in shown.itertuples():
        fix = f" Fix: {row.fix}" if row.fix else ""
        lines.append(f"  {row.severity.upper()} [{row.what}] {row.where}: {row.problem}{fix}")
    hidden = int((table["severity"] != "warning").sum()) - len(shown) if not table.empty else 0
    if hidden > 0:
        lines.append(f"  ... and {hidden} more (see the table)")
    return "\n".join(lines)


def json_summary(report: PreflightReport) -> str:
    return json.dumps(
        {
            "slides": len(report.slides),
            "errors": report.count("error"),
            "skipped": report.count("skip"),
            "warnings": report.count("warning"),
            "seconds": round(report.seconds, 3),
            "slide_seconds": round(report.slide_seconds, 3),
        }
    )
