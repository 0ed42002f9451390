"""Regions of interest: GeoJSON polygons (as QuPath exports annotations) that restrict tiling to tissue inside them.

Pathologists draw the region to analyse (the tumour, not the adjacent normal; one block of a multi-block slide) in
QuPath and export it with *File → Export objects as GeoJSON*: a FeatureCollection (older QuPath versions: a JSON
array of Features) of Polygon / MultiPolygon geometries in level-0 pixel coordinates, each annotation classified by
``properties.classification.name``. The sheet's ``roi`` column names such a file per slide; tiling keeps the tiles
whose area is at least ``tiling.min_tissue_fraction`` tissue *inside* the regions (holes are outside), optionally
only the regions of the classes in ``tiling.roi_classes``.

The regions are drawn into the tissue mask at the mask's resolution, sampling each mask pixel at its centre (a
scanline fill with the even–odd rule, so a hole of a polygon is a hole): exact for boundaries on the mask's grid,
within a mask pixel otherwise, and linear in the mask's rows × the polygons' edges. QuPath's detections (cells,
tiles) are not regions and are left out.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoclip.errors import InputError, SlideError

#: GeoJSON objectTypes (QuPath) that are not regions someone drew.
NOT_REGIONS = frozenset({"detection", "cell", "tile"})


@dataclass(frozen=True)
class Region:
    """One polygon: its rings (the exterior first, then holes) as (n, 2) arrays of level-0 x, y; its class or ""."""

    rings: tuple[np.ndarray, ...]
    classification: str


@dataclass(frozen=True)
class RegionsOfInterest:
    """The regions of a slide's ROI file that tiling uses, the classes kept, and the file's hash (provenance)."""

    path: str
    regions: tuple[Region, ...]
    classes: tuple[str, ...]
    sha256: str

    def metadata(self) -> dict[str, Any]:
        """What the tile file records of the regions its tiles were restricted to."""
        return {
            "roi": self.path,
            "roi_sha256": self.sha256,
            "roi_classes": list(self.classes),
            "roi_regions": len(self.regions),
        }

    def bounds(self) -> tuple[float, float, float, float]:
        """(min x, min y, max x, max y) of every region, level-0 px."""
        points = np.concatenate([region.rings[0] for region in self.regions])
        return (*points.min(axis=0).tolist(), *points.max(axis=0).tolist())


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _features(document: Any, where: str) -> list[dict[str, Any]]:
    """The Features of a GeoJSON document: a FeatureCollection, a list of Features (older QuPath), one Feature or
    a bare geometry."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        kind = document.get("type")
        if kind == "FeatureCollection":
            return list(document.get("features") or [])
        if kind == "Feature":
            return [document]
        if kind in ("Polygon", "MultiPolygon"):
            return [{"type": "Feature", "geometry": document, "properties": {}}]
    raise InputError(
        "is not GeoJSON regions: expected a FeatureCollection, a list of Features or a Polygon",
        where=where,
        fix="export the annotations from QuPath with File > Export objects as GeoJSON",
    )


def _classification(properties: dict[str, Any]) -> str:
    value = properties.get("classification")
    if isinstance(value, dict):
        return str(value.get("name") or "")
    return str(value or "")


def _ring(coordinates: Any, where: str) -> np.ndarray:
    ring = np.asarray(coordinates, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] < 2 or len(ring) < 3 or not np.isfinite(ring[:, :2]).all():
        raise InputError(
            "has a ring that is not a list of at least 3 finite [x, y] points",
            where=where,
            fix="re-export the annotation from QuPath, or correct the coordinates",
        )
    return ring[:, :2]


def _polygons(geometry: dict[str, Any], where: str) -> list[list[Any]]:
    kind = geometry.get("type")
    if kind == "Polygon":
        return [geometry.get("coordinates") or []]
    if kind == "MultiPolygon":
        return list(geometry.get("coordinates") or [])
    raise InputError(
        f"has a {kind or 'missing'} geometry, which encloses no area",
        where=where,
        fix="draw the region as an area annotation (rectangle, ellipse, polygon, brush), or remove the feature",
    )


def read_roi(path: str | Path, classes: tuple[str, ...] | list[str] = ()) -> RegionsOfInterest:
    """The regions of a GeoJSON file, only those classified as one of ``classes`` when that is not empty.

    Raises :class:`InputError` naming the file (and the feature) for a file that can't be read, is not GeoJSON
    regions, has a geometry without area, or has no region left after the class filter.
    """
    path = Path(path)
    where = f"ROI file {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot be read ({exc})", where=where, fix="correct the sheet's roi column") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"is not JSON ({exc.msg}, line {exc.lineno})",
            where=where,
            fix="export the annotations from QuPath with File > Export objects as GeoJSON",
        ) from exc
    regions = []
    found_classes = set()
    for index, feature in enumerate(_features(document, where)):
        feature_where = f"{where}, feature {index}"
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise InputError("is not a Feature with a geometry", where=feature_where, fix="re-export the file")
        properties = feature.get("properties") or {}
        if str(properties.get("objectType", "annotation")).lower() in NOT_REGIONS:
            continue
        name = _classification(properties)
        found_classes.add(name)
        if classes and name not in classes:
            continue
        for polygon in _polygons(feature["geometry"], feature_where):
            regions.append(Region(tuple(_ring(ring, feature_where) for ring in polygon), name))
    if not regions:
        kept = f" of the classes {list(classes)} (tiling.roi_classes)" if classes else ""
        named = f"; its classes: {sorted(c or '(none)' for c in found_classes)}" if found_classes else ""
        raise InputError(
            f"has no region{kept}{named}",
            where=where,
            fix="draw the region in QuPath and export it, or correct tiling.roi_classes"
            if classes
            else "draw the region in QuPath and export it",
        )
    return RegionsOfInterest(str(path), tuple(regions), tuple(classes), file_sha256(path))


def _fill_region(mask: np.ndarray, region: Region, scale_x: float, scale_y: float) -> None:
    """Set the pixels of ``mask`` whose centres lie inside ``region`` (even–odd over its rings: holes stay unset)."""
    edges = []
    for ring in region.rings:
        closed = np.vstack([ring, ring[:1]]) if not np.array_equal(ring[0], ring[-1]) else ring
        x, y = closed[:, 0] * scale_x, closed[:, 1] * scale_y
        edges.append(np.stack([x[:-1], y[:-1], x[1:], y[1:]], axis=1))
    x0, y0, x1, y1 = np.concatenate(edges).T
    height, width = mask.shape
    low = max(0, math.floor(min(y0.min(), y1.min()) - 0.5))
    high = min(height, math.ceil(max(y0.max(), y1.max()) + 0.5))
    for row in range(low, high):
        centre = row + 0.5
        crossing = (y0 <= centre) != (y1 <= centre)  # half-open: a vertex on the scanline counts once
        if not crossing.any():
            continue
        xs = np.sort(
            x0[crossing] + (centre - y0[crossing]) * (x1[crossing] - x0[crossing]) / (y1[crossing] - y0[crossing])
        )
        for start, stop in zip(xs[0::2], xs[1::2], strict=True):
            first = max(0, math.ceil(start - 0.5))
            last = min(width, math.ceil(stop - 0.5))  # pixels whose centre is in [start, stop)
            if last > first:
                mask[row, first:last] = True


def roi_mask(roi: RegionsOfInterest, shape: tuple[int, int], level0_size: tuple[int, int]) -> np.ndarray:
    """A boolean mask of ``shape`` (rows, columns) covering level 0 (``level0_size`` = width, height): True inside
    any region."""
    mask = np.zeros(shape, dtype=bool)
    scale_x, scale_y = shape[1] / level0_size[0], shape[0] / level0_size[1]
    for region in roi.regions:
        _fill_region(mask, region, scale_x, scale_y)
    return mask


def read_slide_roi(path: str | Path, classes: tuple[str, ...] | list[str], slide_id: str) -> RegionsOfInterest:
    """:func:`read_roi` for tiling one slide: a bad ROI file is that slide's problem (a :class:`SlideError`, so
    ``on_slide_error`` decides whether the run stops), naming the file and the feature."""
    try:
        return read_roi(path, classes)
    except InputError as exc:
        raise SlideError(slide_id, f"{exc.where}: {exc.problem}", fix=exc.fix) from exc
