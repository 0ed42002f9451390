"""QuPath GeoJSON per slide (``results/qupath/{model}/{slide}.geojson``): the review loop's way into QuPath.

Pathologists review calls in QuPath, not in PNGs. A FeatureCollection in level-0 pixel coordinates (origin at the
top-left of the full-resolution image, which is what QuPath's *File → Import objects* expects) holds:

* the tissue regions as **annotations** (``objectType`` "annotation", class "Tissue", locked): polygons with holes
  traced on the very mask tiling measured the tiles on (``results/qc/tissue/{slide}.png``), so a tile's tissue
  fraction can be checked against what is drawn;
* every tile as a **detection** square carrying **measurements** (numbers only, as QuPath stores them): each
  class's zero-shot score per prompt set (``"{prompt set} score: {class}"``), the tissue fraction and the phenotype
  number; the phenotype's name (with its nearest class) is the detection's name. A tile is **classified** as the
  slide's best class (the calls table's ``best`` of the first prompt set, the one the slide map uses) where that
  class is also the tile's own top class, so the tiles that carry the slide's call stand out in the class colour;
  the others stay unclassified. A model without a text tower has no scores and no classes: phenotypes only.

QuPath's reader (``PathObjectTypeAdapters``) takes ``properties.objectType``, ``properties.classification`` as
``{"name", "color": [r, g, b]}`` (both keys: a classification object without a colour is refused), ``name`` and
``measurements`` as an object of numbers (NaN can't be written in JSON: a missing value is left out). Top-level
members other than ``features`` are ignored by QuPath; the ``histoclip`` member carries the provenance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from histoclip import formats, store
from histoclip.export.tiles import ModelResults, SlideTiles, model_provenance, write_index
from histoclip.formats import TissueMask

__all__ = [
    "TISSUE_CLASS",
    "export_qupath_shard",
    "export_slide_geojson",
    "mask_polygons",
    "score_measurement",
    "slide_best_classes",
    "slide_feature_collection",
    "tile_top_classes",
    "tissue_polygons",
    "write_geojson",
]

#: The class of the tissue annotations, and its colour (the QC thumbnail's tissue outline).
TISSUE_CLASS = "Tissue"
TISSUE_RGB = (0, 200, 0)
#: Measurement names of a detection besides the scores.
TISSUE_FRACTION = "tissue fraction"
PHENOTYPE = "phenotype"
#: Outlines are simplified by at most this many mask pixels (a quarter pixel: the drawn tissue stays the mask's).
SIMPLIFY_MASK_PX = 0.25


def score_measurement(prompt_set: str, cls: str) -> str:
    """The measurement name of a class's zero-shot score, e.g. ``"demo score: necrosis"`` (QuPath: *Measure →
    Show detection measurements*, or colour by it with *Measure → Measurement maps*)."""
    return f"{prompt_set} score: {cls}"


def mask_polygons(mask: np.ndarray, simplify_px: float = SIMPLIFY_MASK_PX) -> list[shapely.Polygon]:
    """The outlines of a boolean mask's regions as polygons with holes, in mask pixel units (pixel (row, col) is
    the unit square [col, col + 1] × [row, row + 1]; x right, y down).

    Traced by marching squares at the 0.5 level through the pixel centres (contourpy, matplotlib's contour engine,
    in C++: a 3,000² mask takes well under a second), so every mask pixel's centre lies inside and every other
    pixel's centre outside; then simplified by at most ``simplify_px`` (which keeps that, and drops the
    staircase's collinear points). Regions touching only at a corner come out as separate polygons.
    """
    import contourpy

    mask = np.asarray(mask, bool)
    if not mask.any():
        return []
    z = np.pad(mask, 1).astype(np.float64)
    generator = contourpy.contour_generator(z=z, fill_type=contourpy.FillType.OuterOffset, name="serial")
    points, offsets = generator.filled(0.5, 2.0)
    polygons = []
    for xy, offset in zip(points, offsets, strict=True):
        # padded index → mask pixel units: the centre of mask pixel (r, c) is padded index (r + 1, c + 1)
        rings = [xy[offset[i] : offset[i + 1]] - 0.5 for i in range(len(offset) - 1)]
        polygon = shapely.Polygon(rings[0], rings[1:])
        if simplify_px > 0:
            polygon = polygon.simplify(simplify_px, preserve_topology=True)
        if not polygon.is_empty:
            polygons.append(polygon)
    polygons.sort(key=lambda p: (p.bounds[1], p.bounds[0]))
    return polygons


def tissue_polygons(tissue: TissueMask, simplify_px: float = SIMPLIFY_MASK_PX) -> list[shapely.Polygon]:
    """A slide's tissue regions in level-0 pixels (:func:`mask_polygons` scaled by the mask's level-0 size)."""
    sx, sy = tissue.level0_px_per_mask_px
    return [shapely.transform(p, lambda xy: xy * [sx, sy]) for p in mask_polygons(tissue.mask, simplify_px)]


def tile_top_classes(scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """Each tile's highest-scoring class of a prompt set (background classes included)."""
    classes = list(scores)
    return np.asarray(classes, object)[np.argmax(np.stack([scores[c] for c in classes], axis=1), axis=1)]


def _hex_rgb(colour: str) -> list[int]:
    colour = colour.lstrip("#")
    return [int(colour[i : i + 2], 16) for i in (0, 2, 4)]


def class_rgb(classes: Sequence[str]) -> dict[str, list[int]]:
    """The figures' colour of each class (:func:`histoclip.plots.class_colours`), as QuPath's [r, g, b]."""
    from histoclip.plots import class_colours

    return {cls: _hex_rgb(colour) for cls, colour in class_colours(classes).items()}


def _number(value: float) -> float | int | None:
    """A measurement as JSON writes it: 7 significant digits (a float32 score's precision), None for NaN."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.7g}")


def _ring(coords: Any) -> list[list[float]]:
    return [[round(float(x), 2), round(float(y), 2)] for x, y in coords]


def _polygon_geometry(polygon: shapely.Polygon) -> dict[str, Any]:
    return {
        "type": "Polygon",
        "coordinates": [_ring(polygon.exterior.coords), *(_ring(r.coords) for r in polygon.interiors)],
    }


def _tissue_feature(polygon: shapely.Polygon, number: int) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": _polygon_geometry(polygon),
        "properties": {
            "objectType": "annotation",
            "name": f"{TISSUE_CLASS} {number}",
            "classification": {"name": TISSUE_CLASS, "color": list(TISSUE_RGB)},
            "isLocked": True,
        },
    }


def slide_feature_collection(
    tiles: SlideTiles,
    tissue: TissueMask | None,
    *,
    classify_by: str | None = None,
    best_class: str | None = None,
    class_colours: Mapping[str, Sequence[int]] | None = None,
    phenotype_names: Sequence[str] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The slide's FeatureCollection (see the module docstring): tissue annotations, then one detection per tile.

    ``classify_by``: the prompt set whose tile scores decide a tile's top class; ``best_class``: the slide's best
    class by that prompt set (None: no tile is classified); ``class_colours``: [r, g, b] per class;
    ``phenotype_names``: the name of each phenotype number. ``tissue`` None: no annotations (a failed slide).
    """
    features = []
    for number, polygon in enumerate(tissue_polygons(tissue) if tissue is not None else [], start=1):
        features.append(_tissue_feature(polygon, number))
    side = tiles.tile_level0_px if len(tiles) else 0
    measurement_columns = [(TISSUE_FRACTION, tiles.tissue)]
    for prompt_set, by_class in tiles.scores.items():
        measurement_columns += [(score_measurement(prompt_set, cls), values) for cls, values in by_class.items()]
    if tiles.phenotype is not None:
        measurement_columns.append((PHENOTYPE, tiles.phenotype))
    classified = np.zeros(len(tiles), bool)
    if best_class and classify_by in tiles.scores and len(tiles):
        classified = tile_top_classes(tiles.scores[classify_by]) == best_class
    colour = list((class_colours or {}).get(best_class or "", (200, 0, 0)))
    columns = [(name, np.asarray(values).tolist()) for name, values in measurement_columns]
    for i, (x, y) in enumerate(zip(tiles.x.tolist(), tiles.y.tolist(), strict=True)):
        measurements = {}
        for name, values in columns:
            value = _number(values[i])
            if value is not None:
                measurements[name] = value
        properties: dict[str, Any] = {"objectType": "detection"}
        if tiles.phenotype is not None and phenotype_names is not None:
            properties["name"] = phenotype_names[int(tiles.phenotype[i])]
        if classified[i]:
            properties["classification"] = {"name": best_class, "color": colour}
        properties["measurements"] = measurements
        square = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        features.append(
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}, "properties": properties}
        )
    return {"type": "FeatureCollection", "features": features, "histoclip": _json_safe(dict(provenance or {}))}


def _json_safe(value: Any) -> Any:
    """Provenance as JSON can hold it: NaN and infinities (a failed slide's unknown mpp) become null."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_geojson(path: str | Path, collection: Mapping[str, Any]) -> None:
    """Write a FeatureCollection atomically (compact JSON: a slide of 50,000 tiles is ~15 MB)."""
    store.write_text_atomic(path, json.dumps(collection, separators=(",", ":"), allow_nan=False) + "\n")


def slide_best_classes(results: ModelResults) -> dict[str, str]:
    """{slide: best class} by the first prompt set's calls table ("" for a slide never called); {} without one."""
    first = results.first_prompt_set
    if first is None:
        return {}
    calls = formats.read_calls(results.calls[first])
    return dict(zip(calls["slide_id"], calls["best"], strict=True))


def export_slide_geojson(
    slide_id: str,
    tile_file: str | Path,
    mask_file: str | Path,
    embedding_file: str | Path,
    results: ModelResults,
    out: str | Path,
    *,
    best_classes: Mapping[str, str] | None = None,
    phenotype_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Read one slide's files, write its GeoJSON; return its index row. ``best_classes`` and ``phenotype_names``
    (cohort-wide) are read from ``results`` when not given."""
    tiles = results.read_slide(slide_id, tile_file, embedding_file)
    best_classes = slide_best_classes(results) if best_classes is None else best_classes
    phenotype_names = results.phenotype_names() if phenotype_names is None else phenotype_names
    tissue = formats.read_tissue_mask(mask_file)
    classify_by = results.first_prompt_set
    classes = list(tiles.scores.get(classify_by, {})) if classify_by else []
    best = best_classes.get(slide_id) or None
    provenance = {
        "slide_id": slide_id,
        "status": tiles.status,
        **({"error": tiles.tile_meta["error"]} if tiles.tile_meta.get("error") else {}),
        "coordinates": "level-0 pixels, origin at the top-left corner of the full-resolution image",
        "tile_level0_px": tiles.tile_meta.get("tile_level0_px"),
        "level0_mpp": tiles.tile_meta.get("level0_mpp"),
        "tissue_mask_mpp": tissue.mask_mpp,
        "classified_by": {"prompt_set": classify_by, "slide_best_class": best} if classify_by else None,
        "prompt_sets": list(tiles.scores),
        **model_provenance(results.model, tiles.embedding_meta),
    }
    collection = slide_feature_collection(
        tiles,
        tissue if tissue.status == "ok" else None,
        classify_by=classify_by,
        best_class=best,
        class_colours=class_rgb(classes) if classes else None,
        phenotype_names=phenotype_names,
        provenance=provenance,
    )
    write_geojson(out, collection)
    return {"slide_id": slide_id, "path": str(out), "n_tiles": len(tiles), "status": tiles.status}


def export_qupath_shard(
    slide_ids: Sequence[str],
    tile_files: Sequence[str | Path],
    mask_files: Sequence[str | Path],
    embedding_files: Sequence[str | Path],
    results: ModelResults,
    outputs: Sequence[str | Path],
    index: str | Path,
) -> list[dict[str, Any]]:
    """Every slide of a shard (:func:`export_slide_geojson`), then the shard's index."""
    best_classes = slide_best_classes(results)
    phenotype_names = results.phenotype_names()
    rows = [
        export_slide_geojson(
            slide_id, tiles, mask, embeddings, results, out, best_classes=best_classes, phenotype_names=phenotype_names
        )
        for slide_id, tiles, mask, embeddings, out in zip(
            slide_ids, tile_files, mask_files, embedding_files, outputs, strict=True
        )
    ]
    write_index(index, rows)
    return rows
