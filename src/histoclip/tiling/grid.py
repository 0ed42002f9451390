"""Tile grids at a target resolution.

A tile is a square of ``tile_px`` pixels at ``target_mpp`` µm/px, i.e. ``tile_level0_px`` pixels of level 0.
Its position is stored in level-0 pixels (the only coordinate system every reader agrees on); the level it
is read from (the coarsest not coarser than the target) and the size there are recorded so that the
embedding step reads exactly what tiling measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoclip import formats, staging
from histoclip.config import SectionSettings, default_config
from histoclip.errors import SlideError
from histoclip.tiling import qc
from histoclip.tiling import slide as wsi
from histoclip.tiling.roi import RegionsOfInterest, read_slide_roi, roi_mask
from histoclip.tiling.tissue import TissueParams, detect_tissue


@dataclass(frozen=True)
class TilingParams(SectionSettings, section="tiling"):
    """What decides a slide's tile grid (config key ``tiling``, but for how jobs are cut)."""

    target_mpp: float
    tile_px: int
    overlap_px: int
    min_tissue_fraction: float


@dataclass(frozen=True)
class TileGrid:
    """Kept tiles: level-0 top-left corners and tissue fraction, in row-major order."""

    x: np.ndarray
    y: np.ndarray
    tissue: np.ndarray
    tile_level0_px: int
    stride_level0_px: int

    def __len__(self) -> int:
        return int(self.x.size)


def area_fractions(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Exact fraction of each rectangle [x0, x1) × [y0, y1) (in mask pixels, fractional) covered by ``mask``.

    The integral of a piecewise-constant image is bilinear inside each pixel, so bilinear interpolation of
    the summed-area table at fractional corners gives the exact covered area: tiles that straddle mask
    pixels are weighted by overlap, not rounded to whole pixels.
    """
    height, width = mask.shape
    sat = np.zeros((height + 1, width + 1), dtype=np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)

    def integral(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        u = np.clip(u, 0, width)
        v = np.clip(v, 0, height)
        iu = np.minimum(np.floor(u).astype(np.int64), width - 1)
        iv = np.minimum(np.floor(v).astype(np.int64), height - 1)
        fu, fv = u - iu, v - iv
        return (
            sat[iv, iu] * (1 - fu) * (1 - fv)
            + sat[iv, iu + 1] * fu * (1 - fv)
            + sat[iv + 1, iu] * (1 - fu) * fv
            + sat[iv + 1, iu + 1] * fu * fv
        )

    covered = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    area = (x1 - x0) * (y1 - y0)
    return np.clip(covered / np.maximum(area, 1e-12), 0.0, 1.0)


def tile_level0_px(params: TilingParams, mpp: float) -> int:
    """Side of a tile in level-0 pixels of a slide whose level 0 is ``mpp`` µm/px."""
    return max(1, round(params.tile_px * (params.target_mpp / mpp)))


def read_tile_px(tile_level0_px: int, downsample: float) -> int:
    """Side of a tile at the level it is read from (``downsample`` of level 0), before resizing."""
    return max(1, math.ceil(tile_level0_px / downsample - 1e-6))


def tile_grid(mask: np.ndarray, level0_size: tuple[int, int], mpp: float, params: TilingParams) -> TileGrid:
    """Every tile of the regular grid that lies fully inside the slide and has enough tissue.

    ``mask`` covers the whole of level 0 (``level0_size`` = width, height) at any lower resolution.
    """
    width, height = level0_size
    tile_px = tile_level0_px(params, mpp)
    stride_level0_px = max(1, round((params.tile_px - params.overlap_px) * (params.target_mpp / mpp)))
    xs = np.arange(0, width - tile_px + 1, stride_level0_px, dtype=np.int64)
    ys = np.arange(0, height - tile_px + 1, stride_level0_px, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    gx, gy = gx.ravel(), gy.ravel()
    sx = mask.shape[1] / width
    sy = mask.shape[0] / height
    fractions = area_fractions(
        mask.astype(np.float32), gx * sx, gy * sy, (gx + tile_px) * sx, (gy + tile_px) * sy
    ).astype(np.float32)
    keep = fractions >= params.min_tissue_fraction - 1e-6
    return TileGrid(gx[keep], gy[keep], fractions[keep], tile_px, stride_level0_px)


@dataclass
class SlideTiling:
    """Everything tiling learnt about a slide; ``metadata()`` is what goes into the tile file and QC table."""

    slide_id: str
    patient_id: str
    path: str
    vendor: str
    reader: str
    level0_width: int
    level0_height: int
    level_downsamples: list[float]
    mpp: float
    mpp_source: str
    params: TilingParams
    tissue_params: TissueParams
    read_level: int
    read_level_mpp: float
    read_tile_px: int
    tissue_level: int
    tissue_mask_mpp: float
    tissue_area_mm2: float
    grid: TileGrid
    mask: np.ndarray
    qc_rgb: np.ndarray
    warnings: list[str] = field(default_factory=list)
    roi: RegionsOfInterest | None = None

    def metadata(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id,
            "patient_id": self.patient_id,
            "status": "ok",
            "error": "",
            "path": self.path,
            "vendor": self.vendor,
            "reader": self.reader,
            "level0_width": self.level0_width,
            "level0_height": self.level0_height,
            "level_count": len(self.level_downsamples),
            "level_downsamples": self.level_downsamples,
            "level0_mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "target_mpp": self.params.target_mpp,
            "tile_px": self.params.tile_px,
            "overlap_px": self.params.overlap_px,
            "tile_level0_px": self.grid.tile_level0_px,
            "stride_level0_px": self.grid.stride_level0_px,
            "min_tissue_fraction": self.params.min_tissue_fraction,
            "read_level": self.read_level,
            "read_level_mpp": self.read_level_mpp,
            "read_tile_px": self.read_tile_px,
            "tissue_level": self.tissue_level,
            "tissue_mask_mpp": self.tissue_mask_mpp,
            "tissue_params": asdict(self.tissue_params),
            "tissue_area_mm2": self.tissue_area_mm2,
            "n_tiles": len(self.grid),
            "warnings": self.warnings,
            **(self.roi.metadata() if self.roi is not None else {}),
        }


def too_small_error(slide_id: str, level0_size: tuple[int, int], mpp: float, params: TilingParams) -> SlideError | None:
    """The error for a slide smaller than one tile at the target resolution (None when a tile fits).

    Such a slide can give no tile whatever its tissue, so it is told apart from "no tissue tile" (whose fix is
    about staining and thresholds) and caught by the preflight before any job runs: what is in the sheet is
    usually a thumbnail, label image or crop instead of the slide.
    """
    width, height = level0_size
    tile_px = tile_level0_px(params, mpp)
    if width >= tile_px and height >= tile_px:
        return None
    return SlideError(
        slide_id,
        f"is smaller than one tile: level 0 is {width}×{height} px at {mpp:.4g} µm/px "
        f"({width * mpp:.4g}×{height * mpp:.4g} µm), and a {params.tile_px}-px tile at {params.target_mpp} µm/px "
        f"needs {tile_px}×{tile_px} level-0 px ({tile_px * mpp:.4g}×{tile_px * mpp:.4g} µm)",
        fix="check that the sheet's path is the whole-slide image, not a thumbnail, label image or crop, and "
        "remove the row if it is not a slide",
    )


def on_slide_error_fix(fix: str, on_slide_error: str) -> str:
    """``fix`` with what ``on_slide_error`` means for the slide: under ``fail``, that ``record`` would record it and
    go on; under ``record``, that the run does so. Never advice to set what is already set."""
    if on_slide_error == "record":
        return f"{fix} (on_slide_error: record, so the run records this slide as failed and goes on)"
    return f"{fix}; or set on_slide_error: record to record the slide as failed and go on"


def failed_metadata(
    slide_id: str, patient_id: str, path: str, error: str, known: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Metadata of a slide recorded as failed (``on_slide_error: record``): no tiles, the cause kept, and what was
    learnt of the slide before it failed (``known``: reader, size, mpp and its source), so the cohort table and its
    QC figure do not call an mpp "unknown" that the metadata had."""
    return {
        **(known or {}),
        "slide_id": slide_id,
        "patient_id": patient_id,
        "status": "error",
        "error": error,
        "path": path,
        "n_tiles": 0,
    }


def slide_facts(
    path: str | Path,
    slide_id: str,
    *,
    sheet_mpp: float | None = None,
    plausible_mpp: wsi.MppRange | None = None,
    sheet_mpp_cell: str = "",
    **_: Any,
) -> dict[str, Any]:
    """What can still be read of a slide whose tiling failed: its reader, vendor and pyramid if it opens, its mpp and
    the mpp's source if those resolve; each step that fails leaves its keys out (best effort, never raises)."""
    facts: dict[str, Any] = {}
    try:
        with wsi.open_wsi(path, slide_id) as slide:
            width, height = slide.dimensions
            facts |= {"reader": slide.name, "vendor": slide.vendor, "level0_width": width, "level0_height": height}
            facts["level_count"] = len(slide.level_downsamples)
            plausible = plausible_mpp or wsi.MppRange.from_config(default_config())
            resolved = wsi.resolve_mpp(slide, path, slide_id, sheet_mpp, plausible, mpp_cell=sheet_mpp_cell)
            facts |= {"level0_mpp": resolved.mpp, "mpp_source": resolved.source}
    except Exception:  # noqa: BLE001 - the slide already failed with its own error; this only adds what it can
        pass
    return facts


def tissue_image(
    slide: wsi.SlideReader, mpp: float, tissue_mpp: float, slide_id: str, path: str | Path | None = None
) -> tuple[int, np.ndarray, float]:
    """(level, RGB image, its mpp) for tissue detection: the level nearest ``tissue_mpp``, downsampled to it.

    Level 0 is read only when the slide has no coarser level near the wanted resolution (small,
    single-level slides).
    """
    level = wsi.nearest_level(slide, mpp, tissue_mpp)
    rgb = wsi.read_level_rgb(slide, level, slide_id, path)
    level_mpp = mpp * slide.level_downsamples[level]
    if level_mpp < tissue_mpp * (1 - wsi.LEVEL_TOLERANCE):
        width, height = slide.dimensions
        size = (max(1, round(width * mpp / tissue_mpp)), max(1, round(height * mpp / tissue_mpp)))
        rgb = wsi.resize_rgb(rgb, size)
    mask_mpp = mpp * slide.dimensions[0] / rgb.shape[1]
    return level, rgb, mask_mpp


def qc_level_for(slide: wsi.SlideReader, thumbnail_px: int) -> int:
    """The coarsest level still at least ``thumbnail_px`` on its longest side (or level 0 if none is)."""
    wanted = min(thumbnail_px, max(slide.dimensions))
    big_enough = [level for level, dims in enumerate(slide.level_dimensions) if max(dims) >= wanted]
    return max(big_enough) if big_enough else 0


#: The largest level (pixels) read for a failed slide's QC image: a failed slide never costs a level-0 read.
FAILED_THUMBNAIL_MAX_PX = 4096 * 4096


def failed_slide_thumbnail(path: str | Path, slide_id: str, thumbnail_px: int) -> np.ndarray | None:
    """What of a failed slide can still be read for its QC image (RGB), or None.

    Levels are tried from the coarsest one at least ``thumbnail_px`` on its longest side, then the coarser ones,
    then finer ones up to :data:`FAILED_THUMBNAIL_MAX_PX`: a damaged tissue level may have intact neighbours. Each
    try opens the slide again, because an OpenSlide handle keeps failing once a read has failed.
    """
    try:
        with wsi.open_wsi(path, slide_id) as slide:
            dims = [tuple(d) for d in slide.level_dimensions]
    except Exception:  # not openable at all: the image is text only
        return None
    wanted = min(thumbnail_px, max(dims[0]))
    big = sorted((lv for lv, d in enumerate(dims) if max(d) >= wanted), key=lambda lv: dims[lv][0] * dims[lv][1])
    small = sorted((lv for lv, d in enumerate(dims) if max(d) < wanted), key=lambda lv: -dims[lv][0] * dims[lv][1])
    for level in [big[0], *small, *big[1:]] if big else small:
        if dims[level][0] * dims[level][1] > FAILED_THUMBNAIL_MAX_PX:
            continue
        try:
            with wsi.open_wsi(path, slide_id) as slide:
                return wsi.read_level_rgb(slide, level, slide_id)
        except Exception:  # this level is damaged too: try the next
            continue
    return None


def tile_slide(
    path: str | Path,
    slide_id: str,
    *,
    patient_id: str = "",
    sheet_mpp: float | None = None,
    params: TilingParams | None = None,
    tissue_params: TissueParams | None = None,
    tissue_mpp: float | None = None,
    plausible_mpp: wsi.MppRange | None = None,
    qc_thumbnail_px: int | None = None,
    sheet_mpp_cell: str = "",
    roi: RegionsOfInterest | None = None,
) -> SlideTiling:
    """Open a slide, resolve its mpp, detect tissue on a low-resolution level and lay the tile grid.

    A setting left out takes the config schema's default; ``sheet_mpp_cell`` is where the slide's empty cell of
    the sheet's ``mpp`` column is, if the sheet has one (see :func:`histoclip.tiling.slide.resolve_mpp`). With
    ``roi`` (the sheet's roi column) tissue outside its regions is not tissue (:mod:`histoclip.tiling.roi`). Raises
    :class:`histoclip.errors.SlideError` (naming the slide and the cause) for unreadable slides and for slides
    smaller than one tile.
    """
    defaults = default_config()
    params = params or TilingParams.from_config(defaults)
    tissue_params = tissue_params or TissueParams.from_config(defaults)
    tissue_mpp = defaults["tissue"]["mpp"] if tissue_mpp is None else tissue_mpp
    plausible_mpp = plausible_mpp or wsi.MppRange.from_config(defaults)
    qc_thumbnail_px = defaults["qc"]["thumbnail_px"] if qc_thumbnail_px is None else qc_thumbnail_px
    with wsi.open_wsi(path, slide_id) as slide:
        resolved = wsi.resolve_mpp(slide, path, slide_id, sheet_mpp, plausible_mpp, mpp_cell=sheet_mpp_cell)
        warnings = [*resolved.warnings, *wsi.check_target(resolved.mpp, params.target_mpp, slide_id)]
        level, rgb, mask_mpp = tissue_image(slide, resolved.mpp, tissue_mpp, slide_id, path)
        too_small = too_small_error(slide_id, slide.dimensions, resolved.mpp, params)
        if too_small is not None:  # after the first read: a damaged file is said to be damaged first
            raise too_small
        mask = detect_tissue(rgb, mask_mpp, tissue_params)
        if roi is not None:
            mask &= roi_mask(roi, mask.shape, slide.dimensions)
        grid = tile_grid(mask, slide.dimensions, resolved.mpp, params)
        qc_level = qc_level_for(slide, qc_thumbnail_px)
        qc_dims = slide.level_dimensions[qc_level]
        qc_rgb = rgb if (rgb.shape[1], rgb.shape[0]) == qc_dims else wsi.read_level_rgb(slide, qc_level, slide_id, path)
        read_level = wsi.read_level_for(slide, resolved.mpp, params.target_mpp)
        downsample = slide.level_downsamples[read_level]
        width, height = slide.dimensions
        return SlideTiling(
            slide_id=slide_id,
            patient_id=patient_id,
            path=str(path),
            vendor=slide.vendor,
            reader=slide.name,
            level0_width=width,
            level0_height=height,
            level_downsamples=[float(d) for d in slide.level_downsamples],
            mpp=resolved.mpp,
            mpp_source=resolved.source,
            params=params,
            tissue_params=tissue_params,
            read_level=read_level,
            read_level_mpp=resolved.mpp * downsample,
            read_tile_px=read_tile_px(grid.tile_level0_px, downsample),
            tissue_level=level,
            tissue_mask_mpp=mask_mpp,
            tissue_area_mm2=float(mask.sum()) * (mask_mpp / 1000.0) ** 2,
            grid=grid,
            mask=mask,
            qc_rgb=qc_rgb,
            warnings=warnings,
            roi=roi,
        )


def no_tissue_error(tiling: SlideTiling, on_slide_error: str = "fail") -> SlideError:
    """A slide without a single tile is an input problem, not a result: it would drop out of every analysis
    without a word. Blank or failed scans are the usual cause, faint staining the other. The fix depends on
    ``on_slide_error`` (:func:`on_slide_error_fix`)."""
    params = tiling.params
    return SlideError(
        tiling.slide_id,
        f"has no tissue tile: no {params.tile_px}-px tile at {params.target_mpp} µm/px is at least "
        f"{params.min_tissue_fraction:.0%} tissue (tissue found: {tiling.tissue_area_mm2:.3g} mm²"
        + (f" inside the regions of {tiling.roi.path}" if tiling.roi is not None else "")
        + ")",
        fix=on_slide_error_fix(
            "look at the slide; remove a blank or failed scan from the sheet; for faint tissue lower "
            "tissue.min_saturation or tiling.min_tissue_fraction",
            on_slide_error,
        ),
    )


def run_tiling(
    path: str | Path,
    slide_id: str,
    tiles_out: str | Path,
    qc_out: str | Path,
    *,
    on_slide_error: str | None = None,
    recorded_path: str | Path | None = None,
    mask_out: str | Path | None = None,
    **tiling_kwargs: Any,
) -> dict[str, Any]:
    """Tile one slide and write its tile table and QC thumbnail (both atomically); return the metadata. With
    ``mask_out``, the tissue mask the tiles were measured on is written there too (:func:`formats.write_tissue_mask`).

    ``recorded_path``: the slide's own path when ``path`` is a staged copy of it (:mod:`histoclip.staging`): the
    tile file records it and errors name it, so outputs are as if the slide had been read where it is.

    ``on_slide_error`` and the settings in ``tiling_kwargs`` (those of :func:`tile_slide`) default to the
    config schema's; ``roi_path`` and ``roi_classes`` name the slide's regions of interest (read here, so that a bad
    ROI file is the slide's error under ``on_slide_error``).

    With ``on_slide_error="record"`` an unreadable slide is written as an empty tile table with
    ``status = "error"`` and the cause, so the rest of the cohort goes on and the failure is visible in the
    cohort table; its QC image shows the error beside what of the slide can still be read
    (:func:`failed_slide_thumbnail`). With ``"fail"`` the :class:`SlideError` propagates and nothing is written. A
    slide without a single tissue tile counts as unreadable (:func:`no_tissue_error`).
    """
    defaults = default_config()
    on_slide_error = defaults["on_slide_error"] if on_slide_error is None else on_slide_error
    qc_thumbnail_px = tiling_kwargs.get("qc_thumbnail_px") or defaults["qc"]["thumbnail_px"]
    tiling = None
    roi_path, roi_classes = tiling_kwargs.pop("roi_path", None), tiling_kwargs.pop("roi_classes", ())
    try:
        if roi_path:
            tiling_kwargs["roi"] = read_slide_roi(roi_path, roi_classes, slide_id)
        tiling = tile_slide(path, slide_id, **tiling_kwargs)
        if recorded_path is not None:
            tiling.path = str(recorded_path)
        if len(tiling.grid) == 0:
            raise no_tissue_error(tiling, on_slide_error)
    except SlideError as exc:
        error = exc if recorded_path is None else staging.unstaged(exc, {str(recorded_path): str(path)})
        if on_slide_error != "record":
            if error is exc:
                raise
            raise error from exc.__cause__
        known = tiling.metadata() if tiling is not None else slide_facts(path, slide_id, **tiling_kwargs)
        recorded = str(path if recorded_path is None else recorded_path)
        meta = failed_metadata(slide_id, tiling_kwargs.get("patient_id", ""), recorded, str(error), known)
        formats.write_tile_file(tiles_out, meta)
        thumbnail = failed_slide_thumbnail(path, slide_id, qc_thumbnail_px)
        qc.save_png(qc.error_thumbnail(slide_id, str(error), thumbnail=thumbnail), qc_out)
        if mask_out is not None:  # no mask: nothing of a failed slide's size is placed on level 0 from it
            formats.write_tissue_mask(
                mask_out, None, failed_metadata(slide_id, meta["patient_id"], recorded, str(error))
            )
        return meta
    meta = tiling.metadata()
    formats.write_tile_file(tiles_out, meta, tiling.grid.x, tiling.grid.y, tiling.grid.tissue)
    if mask_out is not None:
        formats.write_tissue_mask(mask_out, tiling.mask, _mask_metadata(meta))
    image = qc.qc_thumbnail(
        tiling.qc_rgb,
        tiling.mask,
        (tiling.level0_width, tiling.level0_height),
        tiling.grid.x,
        tiling.grid.y,
        tiling.grid.tile_level0_px,
        max_px=qc_thumbnail_px,
    )
    qc.save_png(image, qc_out)
    return meta


def _mask_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """What a tissue mask says about itself: enough to place it on level 0 without the tile file."""
    keys = ("slide_id", "status", "level0_width", "level0_height", "level0_mpp", "tissue_mask_mpp", "tissue_params")
    return {key: meta[key] for key in keys}


def run_tiling_from_settings(
    path: str | Path,
    slide_id: str,
    tiles_out: str | Path,
    qc_out: str | Path,
    settings: dict[str, Any],
    *,
    sheet_mpp_cell: str = "",
    recorded_path: str | Path | None = None,
    mask_out: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`run_tiling` with the validated config sections the tile rule passes (see rules/common.smk), and
    where the slide's empty sheet mpp cell is (for messages only: not a setting)."""
    return run_tiling(
        path,
        slide_id,
        tiles_out,
        qc_out,
        mask_out=mask_out,
        on_slide_error=settings["on_slide_error"],
        recorded_path=recorded_path,
        patient_id=settings["patient_id"],
        sheet_mpp=settings["sheet_mpp"],
        params=TilingParams.from_config(settings),
        tissue_params=TissueParams.from_config(settings),
        tissue_mpp=settings["tissue"]["mpp"],
        plausible_mpp=wsi.MppRange.from_config(settings),
        qc_thumbnail_px=settings["qc_thumbnail_px"],
        sheet_mpp_cell=sheet_mpp_cell,
        roi_path=settings.get("roi"),
        roi_classes=tuple(settings.get("roi_classes", ())),
    )
