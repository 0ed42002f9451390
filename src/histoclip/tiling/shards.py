"""Tiling a shard of slides in one job, each slide still written to its own tile file and QC thumbnail.

Why shards: a slide tiles in seconds, and a job per slide is what Snakemake plans, SLURM queues and both track;
a cohort of 10,000 slides as 10,000 jobs makes the workflow manager, not the tiling, the bottleneck (planning
alone took longer than the 20 s budget). A shard is ``tiling.shard_size`` slides, tiled ``threads`` at a time in
worker processes.

Why resumption (:mod:`histoclip.resume`): a shard killed or failed on one bad slide must not lose the slides
already tiled. A slide tiled without error keeps its tile file and thumbnail under ``.finished/`` with a key: the
slide file (path, size, modification time), every setting that decides its tiles, and the histoclip version. A
re-run reuses a kept slide only when its key is unchanged; anything else is tiled again. Slides recorded as failed
(``on_slide_error: record``) are never kept, so a re-run retries them (the cause may have been transient).
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoclip import staging
from histoclip.errors import InputError, InputErrors
from histoclip.logs import FILE_ONLY
from histoclip.resume import FinishedSlide, reuse_key
from histoclip.tiling.grid import run_tiling_from_settings
from histoclip.tiling.roi import file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideToTile:
    """One slide of a tiling shard: its pixels, its outputs (tile file, thumbnail and, when asked for, the tissue
    mask) and the settings that decide its tiles."""

    slide_id: str
    path: str
    tiles_out: str
    qc_out: str
    settings: dict[str, Any]
    #: Where the slide's empty cell of the sheet's ``mpp`` column is, if the sheet has one: for messages only, so
    #: not part of the settings (which make the reuse key: reordering the sheet must not re-tile anything).
    sheet_mpp_cell: str = ""
    mask_out: str | None = None

    @property
    def outputs(self) -> list[str]:
        return [self.tiles_out, self.qc_out] + ([self.mask_out] if self.mask_out else [])


@dataclass
class TilingShardReport:
    """What a shard job did: slides reused from ``.finished/``, tiled, recorded as failed, and the errors."""

    reused: list[str] = field(default_factory=list)
    tiled: list[str] = field(default_factory=list)
    recorded_failed: list[str] = field(default_factory=list)
    errors: dict[str, Exception] = field(default_factory=dict)
    n_tiles: int = 0


def finished_slide(slide: SlideToTile) -> FinishedSlide:
    """The slide's tile file and thumbnail with their reuse key (see the module docstring); the key is None when
    the slide file can't be read (tiling it then fails with the slide's own error)."""
    import histoclip

    try:
        stat = os.stat(slide.path)
    except OSError:
        return FinishedSlide.of(slide.outputs, None)
    what = {
        "slide_id": slide.slide_id,
        "path": str(Path(slide.path).resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "settings": slide.settings,
        "histoclip": histoclip.__version__,
    }
    if slide.settings.get("roi"):  # the regions decide the tiles: an edited ROI file re-tiles the slide
        try:
            what["roi_sha256"] = file_sha256(slide.settings["roi"])
        except OSError:
            return FinishedSlide.of(slide.outputs, None)
    return FinishedSlide.of(slide.outputs, reuse_key(what))


def _tile_one(slide: SlideToTile, read_path: str) -> dict[str, Any]:
    return run_tiling_from_settings(
        read_path,
        slide.slide_id,
        slide.tiles_out,
        slide.qc_out,
        slide.settings,
        sheet_mpp_cell=slide.sheet_mpp_cell,
        recorded_path=slide.path,
        mask_out=slide.mask_out,
    )


def tile_shard(slides: Sequence[SlideToTile], threads: int = 1, stage_dir: str | None = None) -> TilingShardReport:
    """Tile every slide of a shard (``threads`` at a time), reusing kept slides; raise after the last slide if any
    failed, so one bad slide costs the re-run only itself.

    ``stage_dir`` (config ``tiling.stage_dir``): the slides still to tile are copied there first and read from there
    (:mod:`histoclip.staging`); tile files, keys and errors name the slides' own paths.

    With ``on_slide_error: record`` an unreadable slide is written with status "error" and is not an error here;
    with ``fail`` its :class:`~histoclip.errors.SlideError` is raised (several: one
    :class:`~histoclip.errors.InputErrors` naming each slide). A failed slide is logged when it fails to the log
    file only, with its traceback: the console gets it once, from the error raised at the end
    (:mod:`histoclip.logs`).
    """
    report = TilingShardReport()
    todo: list[tuple[SlideToTile, FinishedSlide]] = []
    for slide in slides:
        kept = finished_slide(slide)
        if kept.restore():
            report.reused.append(slide.slide_id)
        else:
            todo.append((slide, kept))
    if report.reused:
        log.info("reusing %d finished slide(s): %s", len(report.reused), ", ".join(report.reused))

    def finished(slide: SlideToTile, kept: FinishedSlide, meta: dict[str, Any] | None, error: Exception | None) -> None:
        if error is not None:
            log.error("slide %s could not be tiled: %s", slide.slide_id, error, exc_info=error, extra=FILE_ONLY)
            report.errors[slide.slide_id] = error
            return
        assert meta is not None
        if meta["status"] == "ok":
            kept.keep()
            report.tiled.append(slide.slide_id)
            report.n_tiles += int(meta["n_tiles"])
            log.info("slide %s: %d tiles", slide.slide_id, meta["n_tiles"])
        else:
            report.recorded_failed.append(slide.slide_id)
            log.warning("slide %s recorded as failed: %s", slide.slide_id, meta["error"])

    workers = max(1, min(threads, len(todo)))
    with staging.staged([slide.path for slide, _ in todo], stage_dir, "tiling.stage_dir") as where:
        if workers == 1:
            for slide, kept in todo:
                try:
                    meta, error = _tile_one(slide, where[slide.path]), None
                except Exception as exc:  # every slide gets its chance; the errors are raised together below
                    meta, error = None, exc
                finished(slide, kept, meta, error)
        else:
            # fork: the job script is not importable as a module, which spawn and forkserver would need
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = {pool.submit(_tile_one, slide, where[slide.path]): (slide, kept) for slide, kept in todo}
                for future in concurrent.futures.as_completed(futures):
                    slide, kept = futures[future]
                    error = future.exception()
                    if error is not None and not isinstance(error, Exception):
                        raise error  # KeyboardInterrupt, SystemExit: not a slide's problem
                    finished(slide, kept, None if error else future.result(), error)
    _raise_errors(report, len(slides))
    return report


def _raise_errors(report: TilingShardReport, n_slides: int) -> None:
    if not report.errors:
        return
    errors = list(report.errors.values())
    if len(errors) == 1:
        raise errors[0]
    bugs = [e for e in errors if not isinstance(e, InputError)]
    if bugs:
        raise bugs[0]
    raise InputErrors(
        f"{len(errors)} of {n_slides} slides of this shard could not be tiled (the others are kept and will be "
        "reused by the next run)",
        [e for e in errors if isinstance(e, InputError)],
    )
