"""The synthetic demo cohort: slides with known tissue classes, subtypes and simulated survival.

Why synthetic: the demo and the end-to-end tests must run offline in minutes on two CPU cores, with no
patient data and no downloaded weights, and every stage of the workflow must be checkable against a
truth that is known exactly: the tissue class of every pixel (class maps), the subtype of every slide
(the sheet's ``label``), and the Cox model that generated the survival times (``true_coefficients.tsv``).

How: each slide is laid out at a coarse resolution (:mod:`histoclip.demo.layout`: tissue pieces on glass,
then blob-shaped regions of tumour, stroma, necrosis, lymphocytes and fat) and then painted as two stain
layers, haematoxylin and eosin, in optical density (:mod:`histoclip.demo.paint`). Everything comes from
``numpy.random.default_rng`` streams derived from one seed, and nothing time- or machine-dependent is
written, so two runs give byte-identical files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoclip.demo.captions import CAPTION_MIN_PURITY, CAPTION_TILE_UM, caption_rows
from histoclip.demo.classes import CLASS_MAP_DOWNSAMPLE, NECROSIS, SUBTYPES, TISSUE_CLASSES, write_class_map
from histoclip.demo.layout import slide_layout
from histoclip.demo.paint import render_slide
from histoclip.demo.stain import Stain
from histoclip.demo.survival_sim import clinical_tables
from histoclip.demo.tiff import write_pyramid_tiff
from histoclip.store import atomic_path


def _write_tsv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, lineterminator="\n", float_format="%.6g")


@dataclass(frozen=True)
class DemoCohort:
    """Paths of what :func:`make_demo_cohort` wrote (all inside ``root``)."""

    root: Path
    sheet: Path
    clinical: Path
    coefficients: Path
    captions: Path
    class_maps: Path
    slide_truth: Path
    description: Path


@dataclass(frozen=True)
class _SlideJob:
    slide_id: str
    subtype: int
    necrosis_target: float
    entropy: tuple[int, ...]
    slide_px: int
    mpp: float
    slide_path: Path
    class_map_path: Path
    site_effect: float = 0.0


def _run_slide_job(job: _SlideJob) -> tuple[np.ndarray, list[tuple[str, int, int, int, str, str]]]:
    """Lay out, paint and write one slide and its class map; return class pixel counts and captions.

    Its random streams depend only on the job (seed, slide index), so the result is the same whichever
    worker runs it, and in whatever order.
    """
    layout_rng, render_rng, stain_rng, caption_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(job.entropy).spawn(4)
    )
    label4 = slide_layout(layout_rng, job.slide_px, job.mpp, job.necrosis_target, job.subtype)
    rgb = render_slide(render_rng, label4, job.mpp, Stain.random(stain_rng).shifted(job.site_effect))
    write_pyramid_tiff(job.slide_path, rgb, mpp=job.mpp, downsamples=(1, 4, 16))
    write_class_map(job.class_map_path, label4)
    counts = np.bincount(label4.ravel(), minlength=len(TISSUE_CLASSES)) * CLASS_MAP_DOWNSAMPLE**2
    return counts, caption_rows(caption_rng, job.slide_id, label4, job.mpp)


def _default_workers(n_jobs: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, n_jobs))


def _run_jobs(jobs: list[_SlideJob], workers: int) -> list[Any]:
    if workers <= 1 or len(jobs) <= 1:
        return [_run_slide_job(job) for job in jobs]
    # fork, not spawn/forkserver: those re-import ``__main__``, which breaks callers without a main
    # guard (a Snakemake ``script:`` is one). Workers touch only numpy/PIL/tifffile, no parent threads.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        return list(pool.map(_run_slide_job, jobs, chunksize=1))


#: The demo's hospitals. Slides of the second are stained differently when ``site_effect`` is not 0.
SITES = ("site-A", "site-B")


def _draw_sites(seed: int, n_patients: int) -> np.ndarray:
    """Each patient's hospital (index into SITES), half each, from a stream of its own: adding sites changed no
    other draw of the demo (slides, survival and captions are as they were)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    return rng.permutation(np.arange(n_patients) % len(SITES))


def _split_patients(rng: np.random.Generator, subtype: np.ndarray, train_fraction: float) -> np.ndarray:
    """``train``/``test`` per patient, stratified by subtype, each subtype in both splits if it can be."""
    split = np.full(subtype.size, "test", dtype=object)
    for s in np.unique(subtype):
        members = rng.permutation(np.flatnonzero(subtype == s))
        n_train = int(round(train_fraction * members.size))
        if members.size >= 2:
            n_train = min(max(n_train, 1), members.size - 1)
        split[members[:n_train]] = "train"
    return split


#: A patient's necrosis (fraction of tissue) is NECROSIS_MAX x Beta(*NECROSIS_BETA): right-skewed as in resected
#: carcinomas, where most tumours have a little necrosis and a tail has extensive necrosis (median about 0.13, one
#: patient in ten above 0.37). A narrow range (it was uniform on 0-0.34) gives the necrosis effect too little spread
#: for a cohort to estimate it.
NECROSIS_BETA = (0.8, 2.5)
NECROSIS_MAX = 0.7
#: Slides of one patient differ: each slide's necrosis is the patient's plus N(0, SLIDE_NECROSIS_SD).
SLIDE_NECROSIS_SD = 0.02


@dataclass(frozen=True)
class _Patients:
    """The drawn patients: ids, subtype (index into SUBTYPES), necrosis tendency, age, sex, split, and who
    has a second slide."""

    ids: list[str]
    subtype: np.ndarray
    necrosis: np.ndarray
    age: np.ndarray
    sex: np.ndarray
    split: np.ndarray
    second: np.ndarray
    site: np.ndarray | None = None


def _draw_patients(rng: np.random.Generator, n_patients: int, train_fraction: float, extra_slides: int) -> _Patients:
    """Patients: subtype, necrosis tendency, age, sex, split (the order of draws is part of the demo's output)."""
    subtype = rng.permutation(np.arange(n_patients) % len(SUBTYPES))
    patient_ids = [f"demo-p{i + 1:03d}" for i in range(n_patients)]
    necrosis_patient = NECROSIS_MAX * rng.beta(*NECROSIS_BETA, n_patients)
    age = np.clip(np.rint(rng.normal(64, 9, n_patients)), 38, 88).astype(np.int64)
    sex = rng.choice(np.array(["F", "M"]), n_patients)
    split = _split_patients(rng, subtype, train_fraction)
    second = np.zeros(n_patients, bool)
    second[rng.choice(n_patients, min(extra_slides, n_patients), replace=False)] = True
    return _Patients(patient_ids, subtype, necrosis_patient, age, sex, split, second)


def _slide_jobs(
    rng: np.random.Generator,
    patients: _Patients,
    seed: int,
    slide_px: int,
    mpp: float,
    slides_dir: Path,
    maps_dir: Path,
    site_effect: float = 0.0,
) -> tuple[list[_SlideJob], list[int]]:
    """One job per slide (a patient's necrosis tendency jittered per slide; the second site's stain shifted by
    ``site_effect``), and the patient of each."""
    jobs: list[_SlideJob] = []
    owners: list[int] = []
    for p, pid in enumerate(patients.ids):
        for s in range(2 if patients.second[p] else 1):
            slide_id = f"{pid}-s{s + 1}"
            target = float(np.clip(patients.necrosis[p] + rng.normal(0, SLIDE_NECROSIS_SD), 0, NECROSIS_MAX))
            jobs.append(
                _SlideJob(
                    slide_id=slide_id,
                    subtype=TISSUE_CLASSES.index(SUBTYPES[patients.subtype[p]]),
                    necrosis_target=target,
                    entropy=(seed, 1, len(jobs)),
                    slide_px=slide_px,
                    mpp=float(mpp),
                    slide_path=slides_dir / f"{slide_id}.tiff",
                    class_map_path=maps_dir / f"{slide_id}.png",
                    site_effect=site_effect if patients.site is not None and patients.site[p] == 1 else 0.0,
                )
            )
            owners.append(p)
    return jobs, owners


def _slide_tables(
    jobs: list[_SlideJob], owners: list[int], patients: _Patients, counts: np.ndarray, slide_px: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-slide truth, as realised on the class maps (``counts``: class pixels per slide), and the sheet."""
    tissue_px = counts[:, 1:].sum(axis=1)
    truth = pd.DataFrame(
        {
            "slide_id": [j.slide_id for j in jobs],
            "patient_id": [patients.ids[p] for p in owners],
            "label": [SUBTYPES[patients.subtype[p]] for p in owners],
            "tissue_fraction": tissue_px / slide_px**2,
            "necrosis_fraction": counts[:, NECROSIS] / tissue_px,
        }
    )
    for cls in range(1, len(TISSUE_CLASSES)):
        truth[f"{TISSUE_CLASSES[cls]}_fraction_of_tissue"] = counts[:, cls] / tissue_px

    sheet = pd.DataFrame(
        {
            "slide_id": truth["slide_id"],
            "patient_id": truth["patient_id"],
            "path": [f"slides/{j.slide_id}.tiff" for j in jobs],
            "label": truth["label"],
            "split": [patients.split[p] for p in owners],
            "site": [SITES[patients.site[p]] for p in owners],
        }
    )
    return truth, sheet


def _check_arguments(
    slide_px: int, mpp: float, n_patients: int, train_fraction: float, extra_slides: int, site_effect: float = 0.0
) -> None:
    if slide_px < 256 or slide_px % 64:
        raise ValueError(f"slide_px must be a multiple of 64 and at least 256, got {slide_px}")
    if not (0.05 <= mpp <= 5):
        raise ValueError(f"mpp must be a plausible µm per pixel (0.05-5), got {mpp}")
    if n_patients < 2:
        raise ValueError(f"n_patients must be at least 2 (one per subtype), got {n_patients}")
    if not (0 <= train_fraction <= 1):
        raise ValueError(f"train_fraction must be in [0, 1], got {train_fraction}")
    if extra_slides < 0:
        raise ValueError(f"extra_slides must be >= 0, got {extra_slides}")
    if not (0 <= site_effect <= 1):
        raise ValueError(f"site_effect must be in [0, 1] (a relative stain density change), got {site_effect}")


def make_demo_cohort(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_patients: int = 200,
    extra_slides: int = 20,
    slide_px: int = 2048,
    mpp: float = 0.5,
    train_fraction: float = 0.375,
    site_effect: float = 0.0,
    workers: int | None = None,
) -> DemoCohort:
    """Write a synthetic cohort (slides, sheet, clinical table, truth) into ``out_dir``.

    Files: ``slides/{slide_id}.tiff``, ``slides.tsv`` (sheet: slide_id, patient_id, path, label,
    split, site: half the patients in each of :data:`SITES`, the second's stain shifted by ``site_effect``),
    ``clinical.tsv`` (patient_id, time, event, age, sex, subtype, subtype_squamous,
    necrosis_fraction), ``true_coefficients.tsv``, ``captions.tsv`` (tile-caption pairs),
    ``class_maps/{slide_id}.png``, ``slide_truth.tsv`` (per-slide class fractions) and ``cohort.json``
    (the generator's parameters). Output is byte-identical for the same arguments, whatever
    ``workers`` (processes; default: one per available core).
    """
    _check_arguments(slide_px, mpp, n_patients, train_fraction, extra_slides, site_effect)
    root = Path(out_dir)
    slides_dir, maps_dir = root / "slides", root / "class_maps"
    slides_dir.mkdir(parents=True, exist_ok=True)
    maps_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    patients = _draw_patients(rng, n_patients, train_fraction, extra_slides)
    patients = replace(patients, site=_draw_sites(seed, n_patients))
    jobs, owners = _slide_jobs(rng, patients, seed, slide_px, mpp, slides_dir, maps_dir, site_effect)
    results = _run_jobs(jobs, workers if workers is not None else _default_workers(len(jobs)))
    counts = np.array([r[0] for r in results], dtype=np.float64)
    truth, sheet = _slide_tables(jobs, owners, patients, counts, slide_px)

    # Survival from the known Cox model, on the necrosis actually painted.
    owners_arr = np.asarray(owners)
    tissue_px = counts[:, 1:].sum(axis=1)
    necrosis = np.bincount(owners_arr, counts[:, NECROSIS], n_patients) / np.bincount(owners_arr, tissue_px, n_patients)
    clinical, coefficients, survival = clinical_tables(
        rng, patients.ids, patients.subtype, patients.age, patients.sex, necrosis
    )
    captions = pd.DataFrame(
        [row for r in results for row in r[1]],
        columns=["slide_id", "x", "y", "tile_level0_px", "tissue_class", "caption"],
    )
    description = {
        "generator": "histoclip.synth.make_demo_cohort",
        "seed": seed,
        "n_patients": n_patients,
        "n_slides": len(jobs),
        "slide_px": slide_px,
        "mpp": mpp,
        "pyramid_downsamples": [1, 4, 16],
        "train_fraction": train_fraction,
        "sites": list(SITES),
        "site_effect": site_effect,
        "tissue_classes": list(TISSUE_CLASSES),
        "subtypes": list(SUBTYPES),
        "class_map_downsample": CLASS_MAP_DOWNSAMPLE,
        "caption_tile_um": CAPTION_TILE_UM,
        "caption_min_purity": CAPTION_MIN_PURITY,
        "survival": survival,
    }

    paths = DemoCohort(
        root=root,
        sheet=root / "slides.tsv",
        clinical=root / "clinical.tsv",
        coefficients=root / "true_coefficients.tsv",
        captions=root / "captions.tsv",
        class_maps=maps_dir,
        slide_truth=root / "slide_truth.tsv",
        description=root / "cohort.json",
    )
    _write_tsv(paths.slide_truth, truth)
    _write_tsv(paths.clinical, clinical)
    _write_tsv(paths.coefficients, coefficients)
    _write_tsv(paths.captions, captions)
    with atomic_path(paths.description) as tmp:
        tmp.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _write_tsv(paths.sheet, sheet)  # last: a sheet on disk means the cohort is complete
    return paths
