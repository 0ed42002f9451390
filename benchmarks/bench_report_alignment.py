"""Benchmark: slide–report alignment training on 2,000 slides × 5,000 tiles × 512-d float16 (issue 18).

Run by hand (`python benchmarks/bench_report_alignment.py`); prints JSON. Target on the 2-core dev machine:
time per epoch printed, peak RSS ≤ 4 GB.

The cohort is bench_clustering.py's (per-slide Parquet files as the embedding stage writes them, ~10 GB, kept in
--data for re-runs; writing it is done in child processes and not timed). Every slide gets a report embedding (a
random unit vector mixed with the slide's mean tile embedding, so there is something to learn) and is in the
train split. Timed, in this process, with the workflow's own training function and the schema's default
settings except ``epochs``: each epoch streams the fit slides' bags from their files (``max_tiles`` drawn per
slide) and the validation slides' whole bags. Peak RSS is ``ru_maxrss`` of this process; CPU seconds per epoch
are printed beside wall seconds, with the load average, because the dev machine is shared.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clustering import cohort_parser, ensure_cohort  # noqa: E402


def main() -> None:
    parser = cohort_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the rule's threads)")
    args = parser.parse_args()

    import torch

    from histoclip.bags import BagReader
    from histoclip.config import default_config
    from histoclip.report_alignment.training import AlignmentSettings, train_aligner

    folder = args.data / "embeddings-plain"
    written = ensure_cohort(folder, args.slides, args.tiles, args.dim, args.seed, args.workers, plain=True)
    torch.set_num_threads(args.threads)
    slides = [f"slide{i:05d}" for i in range(args.slides)]
    bags = BagReader({s: folder / f"{s}.parquet" for s in slides}, 2**30)
    rng = np.random.default_rng(args.seed)
    reports = {}
    start = time.perf_counter()
    for s in slides:  # the report: half the slide's mean direction, half noise (one read per slide, untimed)
        mean = bags(s)[2].mean(axis=0)
        vector = mean / np.linalg.norm(mean) + rng.standard_normal(args.dim) / np.sqrt(args.dim)
        reports[s] = (vector / np.linalg.norm(vector)).astype(np.float32)
    setup_s = time.perf_counter() - start
    bags = BagReader({s: folder / f"{s}.parquet" for s in slides}, 2**30)  # a fresh reader: its cache starts empty
    settings = dataclasses.replace(
        AlignmentSettings.from_config(default_config()), epochs=args.epochs, patience=args.epochs + 1
    )
    cpu_start = time.process_time()
    result = train_aligner(
        bags, slides, [f"p{i}" for i in range(args.slides)], {s: s for s in slides}, reports, settings
    )
    print(
        json.dumps(
            {
                "slides": args.slides,
                "tiles_per_slide": args.tiles,
                "dim": args.dim,
                "dtype": "float16",
                "threads": args.threads,
                "cohort": written,
                "report_setup_s": round(setup_s, 1),
                "fit_slides": len(result.train_slides),
                "validation_slides": len(result.validation_slides),
                "epochs": len(result.history) - 1,
                "train_s": round(result.seconds, 1),
                "s_per_epoch": round(result.seconds / max(1, len(result.history) - 1), 1),
                # CPU seconds of this process (all threads): on a shared machine, what an epoch cost, not waited
                "cpu_s_per_epoch": round((time.process_time() - cpu_start) / max(1, len(result.history) - 1), 1),
                "load_average_1min": round(os.getloadavg()[0], 1),
                "history": result.history,
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "bag_cache_mb": bags.cache_bytes / 2**20,
                "settings": settings.__dict__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
