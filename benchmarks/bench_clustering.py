"""Benchmark: tile phenotypes + slide clustering on a synthetic cohort of 2,000 slides × 5,000 tiles × 512-d.

Run by hand (`python benchmarks/bench_clustering.py`); prints JSON. Target on the 2-core dev machine, together
with survival (which is fast): ≤ 3 min and ≤ 4 GB peak RSS.

The cohort is written once as per-slide Parquet files exactly like the embedding stage writes them (x, y,
fixed_size_list<float16> embedding, L2-normalised, weights hash in the metadata): 16 tissue "phenotypes" (random
unit directions) mixed in slide-specific proportions drawn from 4 slide groups, plus noise. It takes about 10 GB
and is kept in --data (default: a folder under the temp dir) for re-runs; writing it is done in a child process
and timed separately, so neither its time nor its memory counts.

Timed, in this process, with the workflow's own functions and its default settings (config schema):
``run_phenotypes`` (stratified sample → MiniBatchKMeans fit → every tile assigned while streaming slide by
slide, per-slide assignment files and the composition tables written) and ``cluster_slides`` on the slide
embeddings (k by silhouette over 2..8, 200 bootstrap refits, PCA map) and on the phenotype compositions.
The slide embeddings are the renormalised slide means the assignment pass collects on the way; the workflow
reads them from the aggregation stage's table instead (one more pass over the files, counted there).
Peak RSS is ``ru_maxrss`` of this process. Read the page-cache note: a second run reads the files from memory
when they fit there.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

N_PHENOTYPES = 16
N_GROUPS = 4
SHA = "bench" + "0" * 59


def _write_slides(args: tuple[str, int, int, int, float, bool, list[int]]) -> None:
    """Write the slides of ``indices`` (a child process; one slide in memory at a time)."""
    folder, n_tiles, dim, seed, noise, plain, indices = args
    centres = np.random.default_rng(seed).standard_normal((N_PHENOTYPES, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    group_mix = np.random.default_rng(seed + 1).dirichlet(np.full(N_PHENOTYPES, 0.3), N_GROUPS)
    from histoclip import store

    for i in indices:
        rng = np.random.default_rng([seed, i])
        mix = rng.dirichlet(group_mix[i % N_GROUPS] * 50 + 0.05)
        labels = rng.choice(N_PHENOTYPES, n_tiles, p=mix)
        tiles = rng.standard_normal((n_tiles, dim), dtype=np.float32)
        tiles *= noise / np.sqrt(dim)  # noise of norm ~noise around a unit centre
        tiles += centres[labels]
        tiles /= np.linalg.norm(tiles, axis=1, keepdims=True)
        side = int(np.ceil(np.sqrt(n_tiles)))
        x = (np.arange(n_tiles) % side) * 224
        y = (np.arange(n_tiles) // side) * 224
        table = pa.table(
            {
                "x": pa.array(x, pa.int64()),
                "y": pa.array(y, pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(tiles.astype(np.float16).ravel()), dim),
            }
        )
        meta = {"weights_sha256": SHA, "dim": dim, "status": "ok"}
        if plain:  # as the embedding stage writes them: dictionary encoding for x and y only
            kv = {k.encode(): store.json_value(v).encode() for k, v in meta.items()}
            with store.atomic_path(Path(folder) / f"slide{i:05d}.parquet") as tmp:
                pq.write_table(table.replace_schema_metadata(kv), tmp, use_dictionary=["x", "y"])
        else:  # pyarrow's default, dictionary encoding of every column (the embedding stage before this was fixed)
            store.write_table_atomic(Path(folder) / f"slide{i:05d}.parquet", table, meta)


def ensure_cohort(
    folder: Path, n_slides: int, n_tiles: int, dim: int, seed: int, workers: int, plain: bool = False
) -> dict:
    """Write the synthetic cohort unless ``folder`` already holds this exact one; returns what was done."""
    spec = {"n_slides": n_slides, "n_tiles": n_tiles, "dim": dim, "seed": seed, "noise": 1.0, "version": 1}
    spec |= {"plain": True} if plain else {}
    marker = folder / "COHORT.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return {"written": False, "write_s": 0.0}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    chunks = [list(range(w, n_slides, workers)) for w in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_write_slides, [(str(folder), n_tiles, dim, seed, 1.0, plain, chunk) for chunk in chunks])
    marker.write_text(json.dumps(spec))
    return {"written": True, "write_s": round(time.perf_counter() - start, 1)}


def cohort_parser(doc: str | None, data_dir: str = "histoclip-bench-clustering") -> argparse.ArgumentParser:
    """A parser with the synthetic cohort's options (size, seed, where it is written), shared by the benchmarks
    that read this cohort."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=2000)
    parser.add_argument("--tiles", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / data_dir)
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="writing the cohort")
    return parser


def main() -> None:
    parser = cohort_parser(__doc__)
    parser.add_argument("--k", type=int, default=None, help="phenotypes (default: the config schema's)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the stage's threads (rule threads)")
    parser.add_argument(
        "--dictionary-embeddings",
        action="store_true",
        help="write the embedding column with dictionary encoding (pyarrow's default, 2-4x slower float16 reads; "
        "the embedding stage encodes only x and y)",
    )
    parser.add_argument("--write-only", action="store_true", help="write the cohort (if needed) and stop")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the stage outputs (else deleted)")
    args = parser.parse_args()

    from histoclip.cohort.clustering import ClusteringSettings, SlideFeatures, cluster_slides
    from histoclip.cohort.phenotypes import PhenotypeSettings, phenotype_columns, run_phenotypes
    from histoclip.config import default_config

    plain = not args.dictionary_embeddings
    cohort = args.data / ("embeddings-plain" if plain else "embeddings")
    written = ensure_cohort(cohort, args.slides, args.tiles, args.dim, args.seed, args.workers, plain)
    if args.write_only:
        print(json.dumps({"cohort": str(cohort), **written}))
        return
    files = sorted(cohort.glob("slide*.parquet"))
    ids = [f.stem for f in files]
    config = default_config({"seed": args.seed, "phenotypes": {"k": args.k} if args.k else {}})
    settings = PhenotypeSettings.from_config(config)
    clustering = ClusteringSettings.from_config(config)
    out = args.data / "out"
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()

    start = time.perf_counter()
    result = run_phenotypes(ids, ids, files, out, settings, threads=args.threads)
    phenotype_s = time.perf_counter() - start

    start = time.perf_counter()
    means = result.slide_means.astype(np.float64)
    embedding = SlideFeatures(ids, ids, result.composition["n_tiles"].to_numpy(), means, "embedding")
    embedding = SlideFeatures(
        ids, ids, embedding.n_tiles, means / np.linalg.norm(means, axis=1, keepdims=True), "embedding"
    )
    _, by_embedding = cluster_slides(embedding, clustering)
    embedding_s = time.perf_counter() - start

    start = time.perf_counter()
    fractions = result.composition[phenotype_columns(settings.k)].to_numpy(np.float64)
    composition = SlideFeatures(ids, ids, embedding.n_tiles, np.sqrt(fractions), "composition")
    _, by_composition = cluster_slides(composition, clustering)
    composition_s = time.perf_counter() - start

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_tiles = int(result.composition["n_tiles"].sum())
    data_bytes = sum(f.stat().st_size for f in files)
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    total = phenotype_s + embedding_s
    print(
        json.dumps(
            {
                "benchmark": "tile phenotypes (sample, fit, streaming assignment) + slide clustering",
                "slides": len(files),
                "tiles": n_tiles,
                "dim": args.dim,
                "embedding_bytes": data_bytes,
                "embedding_encoding": "x, y dictionary-encoded (as the embedding stage)"
                if plain
                else "dictionary (every column)",
                "cohort_written_now": written["written"],
                "write_cohort_s": written["write_s"],
                "threads": args.threads,
                "load_average_at_start": [round(v, 2) for v in load],
                "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
                "phenotypes": {"k": settings.k, "sample_tiles": result.model.n_sample, **config["phenotypes"]},
                "phenotype_s": round(phenotype_s, 1),
                "phenotype_steps_s": {k: round(v, 1) for k, v in result.timings.items()},
                "assigned_tiles_per_s": round(n_tiles / result.timings["assign_s"]),
                "cluster_embedding_s": round(embedding_s, 1),
                "cluster_embedding": {
                    "k": by_embedding["k"],
                    "stability_ari_median": by_embedding["stability"]["ari_median"],
                },
                "cluster_composition_s": round(composition_s, 1),
                "cluster_composition": {
                    "k": by_composition["k"],
                    "stability_ari_median": by_composition["stability"]["ari_median"],
                },
                "clustering_settings": config["clustering"],
                "total_s (phenotypes + embedding clustering)": round(total, 1),
                "target_s": 180,
                "peak_rss_mb": round(peak_mb, 1),
                "target_rss_mb": 4096,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
