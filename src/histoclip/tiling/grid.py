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
import openslide

from histoclip import formats
from histoclip.config import SectionSettings, default_config
from histoclip.errors import SlideError
from histoclip.tiling import qc
from histoclip.tiling import slide as wsi
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

    def metadata(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id,
            "patient_id": self.patient_id,
            "status": "ok",
            "error": "",
            "path": self.path,
            "vendor": self.vendor,
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
        }


def failed_metadata(slide_id: str, patient_id: str, path: str, error: str) -> dict[str, Any]:
    """Metadata of a slide recorded as failed (``on_slide_error: record``): no tiles, the cause kept."""
    return {
        "slide_id": slide_id,
        "patient_id": patient_id,
        "status": "error",
        "error": error,
        "path": path,
        "n_tiles": 0,
    }


def tissue_image(
    slide: openslide.OpenSlide, mpp: float, tissue_mpp: float, slide_id: str, path: str | Path | None = None
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


def qc_level_for(slide: openslide.OpenSlide, thumbnail_px: int) -> int:
    """The coarsest level still at least ``thumbnail_px`` on its longest side (or level 0 if none is)."""
    wanted = min(thumbnail_px, max(slide.dimensions))
    big_enough = [level for level, dims in enumerate(slide.level_dimensions) if max(dims) >= wanted]
    return max(big_enough) if big_enough else 0


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
) -> SlideTiling:
    """Open a slide, resolve its mpp, detect tissue on a low-resolution level and lay the tile grid.

    A setting left out takes the config schema's default. Raises :class:`histoclip.errors.SlideError` (naming
    the slide and the cause) for unreadable slides.
    """
    defaults = default_config()
    params = params or TilingParams.from_config(defaults)
    tissue_params = tissue_params or TissueParams.from_config(defaults)
    tissue_mpp = defaults["tissue"]["mpp"] if tissue_mpp is None else tissue_mpp
    plausible_mpp = plausible_mpp or wsi.MppRange.from_config(defaults)
    qc_thumbnail_px = defaults["qc"]["thumbnail_px"] if qc_thumbnail_px is None else qc_thumbnail_px
    with wsi.open_wsi(path, slide_id) as slide:
        resolved = wsi.resolve_mpp(slide, path, slide_id, sheet_mpp, plausible_mpp)
        warnings = [*resolved.warnings, *wsi.check_target(resolved.mpp, params.target_mpp, slide_id)]
        level, rgb, mask_mpp = tissue_image(slide, resolved.mpp, tissue_mpp, slide_id, path)
        mask = detect_tissue(rgb, mask_mpp, tissue_params)
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
            vendor=slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
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
        )


def no_tissue_error(tiling: SlideTiling) -> SlideError:
    """A slide without a single tile is an input problem, not a result: it would drop out of every analysis
    without a word. Blank or failed scans are the usual cause, faint staining the other."""
    params = tiling.params
    return SlideError(
        tiling.slide_id,
        f"has no tissue tile: no {params.tile_px}-px tile at {params.target_mpp} µm/px is at least "
        f"{params.min_tissue_fraction:.0%} tissue (tissue found: {tiling.tissue_area_mm2:.3g} mm²)",
        fix="look at the slide; remove a blank or failed scan from the sheet (or set on_slide_error: record to "
        "record it and go on); for faint tissue lower tissue.min_saturation or tiling.min_tissue_fraction",
    )


def run_tiling(
    path: str | Path,
    slide_id: str,
    tiles_out: str | Path,
    qc_out: str | Path,
    *,
    on_slide_error: str | None = None,
    mask_out: str | Path | None = None,
    **tiling_kwargs: Any,
) -> dict[str, Any]:
    """Tile one slide and write its tile table and QC thumbnail (both atomically); return the metadata. With
    ``mask_out``, the tissue mask the tiles were measured on is written there too (:func:`formats.write_tissue_mask`).

    ``on_slide_error`` and the settings in ``tiling_kwargs`` (those of :func:`tile_slide`) default to the
    config schema's.

    With ``on_slide_error="record"`` an unreadable slide is written as an empty tile table with
    ``status = "error"`` and the cause, so the rest of the cohort goes on and the failure is visible in the
    cohort table. With ``"fail"`` the :class:`SlideError` propagates and nothing is written. A slide without a
    single tissue tile counts as unreadable (:func:`no_tissue_error`).
    """
    defaults = default_config()
    on_slide_error = defaults["on_slide_error"] if on_slide_error is None else on_slide_error
    qc_thumbnail_px = tiling_kwargs.get("qc_thumbnail_px") or defaults["qc"]["thumbnail_px"]
    try:
        tiling = tile_slide(path, slide_id, **tiling_kwargs)
        if len(tiling.grid) == 0:
            raise no_tissue_error(tiling)
    except SlideError as exc:
        if on_slide_error != "record":
            raise
        meta = failed_metadata(slide_id, tiling_kwargs.get("patient_id", ""), str(path), str(exc))
        formats.write_tile_file(tiles_out, meta)
        qc.save_png(qc.error_thumbnail(slide_id, str(exc)), qc_out)
        if mask_out is not None:
            formats.write_tissue_mask(mask_out, None, meta)
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
    mask_out: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`run_tiling` with the validated config sections the tile rule passes (see rules/common.smk)."""
    return run_tiling(
        path,
        slide_id,
        tiles_out,
        qc_out,
        mask_out=mask_out,
        on_slide_error=settings["on_slide_error"],
        patient_id=settings["patient_id"],
        sheet_mpp=settings["sheet_mpp"],
        params=TilingParams.from_config(settings),
        tissue_params=TissueParams.from_config(settings),
        tissue_mpp=settings["tissue"]["mpp"],
        plausible_mpp=wsi.MppRange.from_config(settings),
        qc_thumbnail_px=settings["qc_thumbnail_px"],
    )
