"""Tile phenotypes: cohort-wide clusters of tile embeddings, named by their nearest text class.

Why: a slide is a mixture of tissue types (tumour, stroma, necrosis, lymphocytes, fat …), and how much of each
it holds is a feature a pathologist can read and a survival model can use. Clustering the tiles of a whole
cohort into k "phenotypes" finds those tissue types without labels; naming each phenotype by the text class
its centroid lies nearest to in the CLIP image–text space makes them readable (and lets phenotypes that share
a name be summed into per-class fractions, e.g. the necrosis fraction of a slide).

How, with memory bounded by the sample and one slide, never by the cohort:

1. sample: at most ``max_tiles_per_slide`` tiles of every slide (fewer when ``max_sample_tiles`` / n slides
   is smaller), drawn with a per-slide random stream derived from the seed and the slide id — stratified by
   slide, so a large slide can't outvote a small one, and unchanged for a slide when others are added;
2. fit: mini-batch k-means (scikit-learn ``MiniBatchKMeans``) on the sample; phenotypes are renumbered by
   size (phenotype_00 is the commonest) so numbers are stable under label permutation;
3. assign: slides are streamed one at a time; every tile gets its nearest centroid and distance. The per-slide
   assignment files, the composition rows and the running "most central tiles" per phenotype are written or
   updated as each slide passes.

Per-tile assignments are stored as one Parquet file per slide (``assignments/{slide}.parquet``: x, y,
phenotype, distance), the same unit as the tile, embedding and tile-score files: a slide's overlay reads one
small file, a re-run or a crash never touches other slides' files, and nothing needs the whole cohort in one
writer. (One cohort file by row groups would save inodes on 10⁵-slide cohorts but makes every per-slide read a
filtered scan, and a killed job loses the whole file.)
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from histoclip import formats, store
from histoclip.cohort.gallery import CentralTiles, gallery_table
from histoclip.config import SectionSettings
from histoclip.errors import InputError
from histoclip.plots import write_tsv

log = logging.getLogger(__name__)

__all__ = [
    "PhenotypeModel",
    "PhenotypeSettings",
    "assign",
    "class_composition",
    "fit_phenotypes",
    "name_phenotypes",
    "phenotype_columns",
    "read_embedding_matrix",
    "run_phenotypes",
    "sample_tiles",
]


@dataclass(frozen=True)
class PhenotypeSettings(SectionSettings, section="phenotypes"):
    """Config key ``phenotypes`` (plus the workflow ``seed``)."""

    k: int
    max_tiles_per_slide: int
    max_sample_tiles: int
    batch_size: int
    n_init: int
    max_iter: int
    gallery_tiles: int
    gallery_max_tiles_per_slide: int
    seed: int


@dataclass(frozen=True)
class PhenotypeModel:
    """Centroids (k × D, in the embedding space), numbered by the sample's cluster sizes, and how they were fit."""

    centroids: np.ndarray
    sample_sizes: np.ndarray
    inertia: float
    n_sample: int
    weights_sha256: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


def phenotype_columns(k: int) -> list[str]:
    """``phenotype_00`` … ``phenotype_{k-1}``, zero-padded so they sort as numbers."""
    width = max(2, len(str(k - 1)))
    return [f"phenotype_{i:0{width}d}" for i in range(k)]


def read_embedding_matrix(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, embeddings [N, D] float32) of one embedding file (:func:`histoclip.formats.read_tile_embeddings`)."""
    x, y, embeddings, _ = formats.read_tile_embeddings(path)
    return x, y, embeddings


def _slide_rng(seed: int, slide_id: str) -> np.random.Generator:
    """A random stream per slide that depends only on the seed and the slide id (not on cohort order or size)."""
    return np.random.default_rng([seed, zlib.crc32(slide_id.encode())])


def _check_same_model(footers: Sequence[formats.EmbeddingFooter]) -> tuple[str | None, int]:
    """The weights hash and dimension every embedding file shares; an error naming the first file that differs."""
    first = footers[0]
    for footer in footers[1:]:
        if footer.weights_sha256 != first.weights_sha256 or footer.dim != first.dim:
            raise InputError(
                f"embeddings were made with weights {str(footer.weights_sha256)[:12]}… ({footer.dim} dimensions), "
                f"those of {first.path} with {str(first.weights_sha256)[:12]}… ({first.dim})",
                where=footer.path,
                fix="re-run the embedding step so that every slide of the cohort uses the same model",
            )
    return first.weights_sha256, first.dim


def _in_threads(function: Any, items: Sequence[Any], threads: int) -> Iterator[Any]:
    """``map(function, items)`` in order, on ``threads`` threads (Parquet decoding and NumPy release the GIL).
    Only small per-slide results wait in the queue; each slide's embeddings live inside one call."""
    if threads <= 1:
        yield from map(function, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        yield from pool.map(function, items)


def sample_tiles(
    slide_ids: Sequence[str], paths: Sequence[str | Path], settings: PhenotypeSettings, threads: int = 1
) -> tuple[np.ndarray, str | None]:
    """The stratified fitting sample (float32 [n, D]) and the model weights hash all files agree on.

    Slides are taken in a random order that depends only on the seed and each slide's id, each giving at most
    ``max_tiles_per_slide`` of its tiles (drawn without replacement), until the sample holds
    ``max_sample_tiles``. A cohort smaller than that is sampled whole at ``max_tiles_per_slide`` a slide; a
    larger one is read only as far as the sample needs, so the fit's cost does not grow with the cohort (the
    assignment pass still reads every slide). A slide's draw never depends on which other slides are in the
    cohort. The sample is allocated once from the files' footers: peak memory is the sample plus one slide
    per thread.
    """
    if len(slide_ids) != len(paths):
        raise ValueError(f"{len(slide_ids)} slide ids but {len(paths)} embedding files")
    if not paths:
        raise InputError("no slides", where="cohort sheet", fix="add slides to the sheet")
    footers = [formats.read_embedding_footer(p) for p in paths]
    weights_sha, dim = _check_same_model(footers)
    order = sorted(range(len(paths)), key=lambda i: (_slide_rng(settings.seed, slide_ids[i]).random(), i))
    items, total = [], 0
    for i in order:
        n = min(footers[i].n_rows, settings.max_tiles_per_slide, settings.max_sample_tiles - total)
        if n > 0:
            items.append((slide_ids[i], paths[i], n))
            total += n
        if total >= settings.max_sample_tiles:
            break
    items.sort(key=lambda item: slide_ids.index(item[0]))  # read in cohort order
    if total < settings.k:
        raise InputError(
            f"the cohort has {total} tiles to fit {settings.k} phenotypes on",
            where="phenotypes.k",
            fix="lower phenotypes.k or raise phenotypes.max_tiles_per_slide (or tile more tissue)",
        )

    def draw(item: tuple[str, str | Path, int]) -> np.ndarray:
        slide_id, path, n = item
        _, _, embeddings = read_embedding_matrix(path)
        rng = _slide_rng(settings.seed, slide_id)
        rng.random()  # the slide's place in the order above
        rows = rng.permutation(len(embeddings))[:n]  # a prefix: a smaller quota takes a subset of a larger one's
        return embeddings[np.sort(rows)]

    sample = np.empty((total, dim), np.float32)
    start = 0
    for drawn in _in_threads(draw, items, threads):
        sample[start : start + len(drawn)] = drawn
        start += len(drawn)
    return sample, weights_sha


def fit_phenotypes(
    sample: np.ndarray, settings: PhenotypeSettings, weights_sha256: str | None = None
) -> PhenotypeModel:
    """Mini-batch k-means on the sample; phenotypes renumbered by sample size (largest first, ties by index)."""
    from sklearn.cluster import MiniBatchKMeans

    if len(sample) < settings.k:
        raise InputError(
            f"{len(sample)} sampled tiles for {settings.k} phenotypes",
            where="phenotypes.k",
            fix="lower phenotypes.k",
        )
    kmeans = MiniBatchKMeans(
        n_clusters=settings.k,
        batch_size=min(settings.batch_size, len(sample)),
        n_init=settings.n_init,
        max_iter=settings.max_iter,
        random_state=settings.seed,
    ).fit(sample)
    sizes = np.bincount(kmeans.labels_, minlength=settings.k)
    order = np.argsort(-sizes, kind="stable")
    return PhenotypeModel(
        centroids=np.asarray(kmeans.cluster_centers_, np.float64)[order],
        sample_sizes=sizes[order],
        inertia=float(kmeans.inertia_),
        n_sample=len(sample),
        weights_sha256=weights_sha256,
        settings=asdict(settings),
    )


def assign(embeddings: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int16) and Euclidean distance to it (float32) of every row.

    The nearest centroid comes from one float32 matrix product (|c|² - 2 e·c; |e|² is the same for every
    centroid), which is what makes assigning millions of tiles cheap; the distance is then computed from the
    difference to that centroid, so it keeps float32 precision even for tiles right on a centroid.
    """
    if len(embeddings) == 0:
        return np.zeros(0, np.int16), np.zeros(0, np.float32)
    e = np.asarray(embeddings, np.float32)
    c = np.asarray(centroids, np.float32)
    score = e @ c.T
    score *= -2.0
    score += np.einsum("ij,ij->i", c, c)[None, :]
    labels = score.argmin(axis=1)
    difference = e - c[labels]
    distance = np.sqrt(np.einsum("ij,ij->i", difference, difference))
    return labels.astype(np.int16), distance.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Naming phenotypes by the text classifier


def name_phenotypes(centroids: np.ndarray, classes: Sequence[str], weights: np.ndarray) -> pd.DataFrame:
    """Nearest and runner-up text class of each centroid: cosine between the normalised centroid and the
    (normalised) classifier weights of every class, background classes included (fat, stroma, … are
    phenotypes too even when they are never called). Columns: nearest_class, similarity, runner_up_class,
    runner_up_similarity."""
    c = np.asarray(centroids, np.float64)
    w = np.asarray(weights, np.float64)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    cosine = c @ w.T
    order = np.argsort(-cosine, axis=1, kind="stable")
    rows = np.arange(len(c))
    second = order[:, 1] if len(classes) > 1 else order[:, 0]
    return pd.DataFrame(
        {
            "nearest_class": np.asarray(classes, object)[order[:, 0]],
            "similarity": cosine[rows, order[:, 0]],
            "runner_up_class": np.asarray(classes, object)[second] if len(classes) > 1 else "",
            "runner_up_similarity": cosine[rows, second] if len(classes) > 1 else np.nan,
        }
    )


def class_composition(
    composition: pd.DataFrame, phenotype_class: Sequence[str], classes: Sequence[str]
) -> pd.DataFrame:
    """Per-class fractions of each slide: the fractions of phenotypes sharing a nearest class, summed.

    One column per class of the prompt set, in its order (0 where no phenotype is named after the class), so
    the columns don't depend on how a clustering run came out.
    """
    columns = phenotype_columns(len(phenotype_class))
    out = composition[["slide_id", "patient_id", "n_tiles"]].copy()
    for name in classes:
        members = [col for col, c in zip(columns, phenotype_class, strict=True) if c == name]
        total = composition[members].sum(axis=1, min_count=1) if members else pd.Series(0.0, index=out.index)
        out[name] = total.where(composition["n_tiles"] > 0, np.nan)
    return out


# --------------------------------------------------------------------------------------------------
# Streaming assignment of the cohort


def _assignment_table(x: np.ndarray, y: np.ndarray, labels: np.ndarray, distance: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "x": pa.array(x, pa.int64()),
            "y": pa.array(y, pa.int64()),
            "phenotype": pa.array(labels, pa.int16()),
            "distance": pa.array(distance, pa.float32()),
        }
    )


@dataclass(frozen=True)
class SlideAssignment:
    """One slide's tiles with their phenotype and distance to its centroid, and the slide's mean embedding."""

    slide_id: str
    x: np.ndarray
    y: np.ndarray
    phenotype: np.ndarray
    distance: np.ndarray
    mean_embedding: np.ndarray


def _provenance_metadata(metadata: Mapping[str, Any]) -> dict[bytes, bytes]:
    """Key-value metadata exactly as :func:`histoclip.store.write_table_atomic` writes it (computed once here, as
    querying package versions per file would cost more than writing a small assignment file)."""
    kv = {str(k): store.json_value(v) for k, v in metadata.items()}
    kv[store.PROVENANCE_KEY] = store.json_value({"versions": store.package_versions()})
    return {k.encode(): v.encode() for k, v in kv.items()}


def iter_assignments(
    slide_ids: Sequence[str],
    paths: Sequence[str | Path],
    model: PhenotypeModel,
    out_dir: str | Path | None = None,
    threads: int = 1,
    metadata: Mapping[str, Any] | None = None,
) -> Iterator[SlideAssignment]:
    """Assign every tile of every slide to its nearest centroid, slide by slide (in order), on ``threads``
    threads; with ``out_dir``, each slide's ``{out_dir}/{slide}.parquet`` (x, y, phenotype, distance) is written
    atomically as it is done. Memory: one slide per thread."""
    kv = _provenance_metadata({**(metadata or {}), "k": model.k, "model_weights_sha256": model.weights_sha256})

    def work(item: tuple[str, str | Path]) -> SlideAssignment:
        slide_id, path = item
        footer = formats.read_embedding_footer(path)
        if model.weights_sha256 is not None and footer.weights_sha256 not in (None, model.weights_sha256):
            raise InputError(
                f"embeddings were made with weights {footer.weights_sha256[:12]}…, "
                f"the phenotypes were fit on {model.weights_sha256[:12]}…",
                where=str(path),
                fix="re-run the embedding step for this slide, or the phenotypes rule",
            )
        if footer.dim != model.centroids.shape[1]:
            raise InputError(
                f"embeddings have {footer.dim} dimensions, the phenotype centroids {model.centroids.shape[1]}",
                where=str(path),
                fix="re-run the phenotypes rule for this model",
            )
        x, y, embeddings = read_embedding_matrix(path)
        labels, distance = assign(embeddings, model.centroids)
        mean = embeddings.mean(axis=0, dtype=np.float64) if len(embeddings) else np.full(footer.dim, np.nan)
        if out_dir is not None:
            table = _assignment_table(x, y, labels, distance)
            meta = {**kv, b"slide_id": store.json_value(slide_id).encode()}
            with store.atomic_path(Path(out_dir) / f"{slide_id}.parquet") as tmp:
                pq.write_table(table.replace_schema_metadata(meta), tmp)
        return SlideAssignment(slide_id, x, y, labels, distance, mean)

    yield from _in_threads(work, list(zip(slide_ids, paths, strict=True)), threads)


@dataclass
class PhenotypeResult:
    model: PhenotypeModel
    composition: pd.DataFrame
    phenotypes: pd.DataFrame
    class_composition: pd.DataFrame
    gallery: pd.DataFrame
    #: mean tile embedding of each slide (not renormalised; NaN rows for slides without tiles), a by-product
    slide_means: np.ndarray
    #: seconds spent sampling, fitting and assigning (for logs and benchmarks)
    timings: dict[str, float]


def run_phenotypes(
    slide_ids: Sequence[str],
    patient_ids: Sequence[str],
    embedding_files: Sequence[str | Path],
    out_dir: str | Path,
    settings: PhenotypeSettings,
    classifiers: Mapping[str, Any] | None = None,
    threads: int = 1,
) -> PhenotypeResult:
    """Sample, fit, stream-assign and name; write every output of ``results/phenotypes/{model}/``.

    ``classifiers``: {prompt set name: :class:`histoclip.zeroshot.calls.TextClassifier`}, in config order; the first
    one names the phenotypes in ``class_composition.tsv``. Outputs: ``centroids.parquet``, ``assignments/``,
    ``composition.tsv``, ``phenotypes.tsv``, ``class_composition.tsv``, ``gallery_tiles.tsv``.

    ``threads`` slides are read and assigned at once; BLAS and OpenMP inside are kept to one thread each, since
    per-slide matrices are small and OpenMP threads spin-waiting on a shared node cost far more than they give.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _run_phenotypes(slide_ids, patient_ids, embedding_files, out_dir, settings, classifiers, threads)


def _run_phenotypes(
    slide_ids: Sequence[str],
    patient_ids: Sequence[str],
    embedding_files: Sequence[str | Path],
    out_dir: str | Path,
    settings: PhenotypeSettings,
    classifiers: Mapping[str, Any] | None,
    threads: int,
) -> PhenotypeResult:
    out_dir = Path(out_dir)
    classifiers = dict(classifiers or {})
    clock = time.perf_counter()
    sample, weights_sha = sample_tiles(slide_ids, embedding_files, settings, threads)
    timings = {"sample_s": time.perf_counter() - clock}
    log.info("fitting %d phenotypes on %d sampled tiles of %d slides", settings.k, len(sample), len(slide_ids))
    clock = time.perf_counter()
    model = fit_phenotypes(sample, settings, weights_sha)
    timings["fit_s"] = time.perf_counter() - clock
    del sample
    _check_classifiers(classifiers, weights_sha)
    _write_centroids(out_dir / "centroids.parquet", model)

    columns = phenotype_columns(model.k)
    tally = _CohortTally.start(columns, settings, dict(zip(slide_ids, patient_ids, strict=True)))
    clock = time.perf_counter()
    assignments = iter_assignments(
        slide_ids, embedding_files, model, out_dir / "assignments", threads, {"phenotypes": columns}
    )
    for done in assignments:
        tally.add(done)
    timings["assign_s"] = time.perf_counter() - clock
    composition = tally.composition()
    formats.write_composition(out_dir / "composition.tsv", composition)

    phenotypes, named = _phenotype_table(tally, model, classifiers)
    write_tsv(phenotypes, out_dir / "phenotypes.tsv")

    if named is not None:
        first = next(iter(classifiers.values()))
        by_class = class_composition(composition, named["nearest_class"].tolist(), first.classes)
    else:
        log.warning(
            "no text classifier (no prompt set in zeroshot.prompt_sets, or a model without a text tower): "
            "phenotypes are numbered, not named, and there are no class fractions"
        )
        by_class = composition[["slide_id", "patient_id", "n_tiles"]].copy()
    formats.write_composition(out_dir / "class_composition.tsv", by_class)

    gallery = gallery_table(tally.central, columns)
    write_tsv(gallery, out_dir / "gallery_tiles.tsv")
    log.info(
        "%d tiles of %d slides assigned; phenotype sizes %s; %s",
        int(tally.counts.sum()),
        len(tally.rows),
        ", ".join(map(str, tally.counts)),
        ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
    )
    means = tally.means
    slide_means = np.stack(means).astype(np.float32) if means else np.zeros((0, model.centroids.shape[1]), np.float32)
    return PhenotypeResult(model, composition, phenotypes, by_class, gallery, slide_means, timings)


def _check_classifiers(classifiers: Mapping[str, Any], weights_sha: str | None) -> None:
    """Refuse a text classifier made with other weights than the embeddings (its names would be meaningless)."""
    for name, classifier in classifiers.items():
        sha = classifier.metadata.get("weights_sha256")
        if weights_sha is not None and sha is not None and sha != weights_sha:
            raise InputError(
                f"text classifier of prompt set {name!r} was made with weights {sha[:12]}…, "
                f"the embeddings with {weights_sha[:12]}…",
                where=f"prompt set {name}",
                fix="re-run encode_prompts for this model",
            )


@dataclass
class _CohortTally:
    """What the assignment pass keeps as slides stream past: per-phenotype totals, the gallery candidates, one
    composition row and one mean embedding per slide."""

    columns: list[str]
    patients: dict[str, str]
    central: list[CentralTiles]
    counts: np.ndarray
    distances: np.ndarray
    slides_with: np.ndarray
    rows: list[dict[str, Any]] = field(default_factory=list)
    means: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def start(cls, columns: list[str], settings: PhenotypeSettings, patients: dict[str, str]) -> _CohortTally:
        k = len(columns)
        central = [CentralTiles(settings.gallery_tiles, settings.gallery_max_tiles_per_slide) for _ in range(k)]
        zeros = np.zeros(k, np.int64)
        return cls(columns, patients, central, zeros, np.zeros(k, np.float64), zeros.copy())

    def add(self, done: SlideAssignment) -> None:
        k = len(self.counts)
        slide_id, x, y, labels, distance = done.slide_id, done.x, done.y, done.phenotype, done.distance
        self.means.append(done.mean_embedding)
        counts = np.bincount(labels, minlength=k)
        self.counts += counts
        self.distances += np.bincount(labels, weights=distance, minlength=k)
        self.slides_with += counts > 0
        for p in np.flatnonzero(counts):
            member = labels == p
            self.central[p].offer(slide_id, x[member], y[member], distance[member])
        n = len(labels)
        fractions = counts / n if n else np.full(k, np.nan)
        self.rows.append(
            {
                "slide_id": slide_id,
                "patient_id": self.patients[slide_id],
                "n_tiles": n,
                **dict(zip(self.columns, fractions, strict=True)),
            }
        )

    def composition(self) -> pd.DataFrame:
        """One row per slide: its tile count and the fraction of its tiles in each phenotype (NaN without tiles)."""
        return pd.DataFrame(self.rows, columns=["slide_id", "patient_id", "n_tiles", *self.columns])


def _phenotype_table(
    tally: _CohortTally, model: PhenotypeModel, classifiers: Mapping[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The rows of ``phenotypes.tsv`` (size, slides, mean distance, nearest class by every prompt set) and the
    naming by the first prompt set (None without one)."""
    total = int(tally.counts.sum())
    phenotypes = pd.DataFrame(
        {
            "phenotype": tally.columns,
            "n_tiles": tally.counts,
            "fraction": tally.counts / total if total else np.nan,
            "n_slides": tally.slides_with,
            "mean_distance": np.divide(
                tally.distances, tally.counts, out=np.full(model.k, np.nan), where=tally.counts > 0
            ),
        }
    )
    named = None
    for i, (name, classifier) in enumerate(classifiers.items()):
        naming = name_phenotypes(model.centroids, classifier.classes, classifier.weights)
        if i == 0:
            named = naming
            phenotypes = pd.concat([phenotypes, naming], axis=1)
        phenotypes[f"nearest_class_{name}"] = naming["nearest_class"].to_numpy()
        phenotypes[f"similarity_{name}"] = naming["similarity"].to_numpy()
    return phenotypes, named


def _write_centroids(path: Path, model: PhenotypeModel) -> None:
    dim = model.centroids.shape[1]
    table = pa.table(
        {
            "phenotype": pa.array(phenotype_columns(model.k)),
            "sample_tiles": pa.array(model.sample_sizes, pa.int64()),
            "centroid": pa.FixedSizeListArray.from_arrays(pa.array(model.centroids.astype(np.float32).ravel()), dim),
        }
    )
    meta = {
        "k": model.k,
        "inertia": model.inertia,
        "n_sample": model.n_sample,
        "weights_sha256": model.weights_sha256,
        "settings": model.settings,
    }
    store.write_table_atomic(path, table, meta)
