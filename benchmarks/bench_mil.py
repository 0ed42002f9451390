"""Benchmark: 5-fold ABMIL on a synthetic cohort of 2,000 slides × 5,000 tiles × 512-d float16 (Parquet).

Run by hand (`python benchmarks/bench_mil.py`); prints JSON. What it answers: the time of one training epoch
(every training bag of a fold read from its file, forward and backward; then the validation bags) and the peak
RSS of the process, which must stay ≤ 4 GB although the embeddings are ~10 GB: bags are streamed from the files,
one ahead of the model (histoclip.mil.bags), never the cohort in memory.

The cohort is bench_clustering's (the same writer, so the same files: per-slide Parquet exactly as the embedding
stage writes them, 16 tissue phenotypes mixed in slide-specific proportions from 4 slide groups); the class of a
slide is its group pair (groups 0-1 vs 2-3), so the task is learnable. Smaller runs (--slides 400) time the same
per-bag work; epoch time grows linearly with slides, RSS does not (compare two sizes: that is the claim).

Timed with the workflow's own functions and its default `mil` settings (config schema): fold 0 of 5
patient-level folds, --epochs epochs (no early stop), then calling the fold's test slides. The 5-fold estimate is
5 × epochs × epoch time + 5 × calling time. Page cache: a cohort larger than free memory is read from disk every
epoch (that is what this measures on a loaded node); a smaller one from memory.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clustering import N_GROUPS, cohort_parser, ensure_cohort  # noqa: E402  (the same synthetic cohort)


def main() -> None:
    parser = cohort_parser(__doc__, "histoclip-bench-mil")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of fold 0 timed")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (rule threads)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from histoclip.bags import BagReader
    from histoclip.config import default_config
    from histoclip.mil.crossval import load_state
    from histoclip.mil.folds import patient_folds, validation_split
    from histoclip.mil.settings import MilSettings
    from histoclip.mil.train import predict, train_model

    cohort = args.data / f"embeddings-{args.slides}x{args.tiles}x{args.dim}"
    written = ensure_cohort(cohort, args.slides, args.tiles, args.dim, args.seed, args.workers, plain=True)
    files = sorted(cohort.glob("slide*.parquet"))
    ids = [f.stem for f in files]
    labels = pd.Series(["g01" if int(s[5:]) % N_GROUPS < 2 else "g23" for s in ids], index=ids)
    mil = {"max_epochs": args.epochs, "patience": args.epochs + 1, "threads": args.threads, "device": args.device}
    settings = MilSettings.from_config(default_config({"seed": args.seed, "mil": mil}))
    torch.set_num_threads(args.threads)
    folds = patient_folds(labels, settings.folds, settings.seed, where="bench")
    test = folds[folds == 0].index.tolist()
    rest = labels[folds != 0]
    held = validation_split(rest, settings.validation_fraction, settings.seed, 0)
    train, val = rest[~held], rest[held]
    index = {"g01": 0, "g23": 1}
    bags = BagReader(dict(zip(ids, map(str, files), strict=True)), settings.bag_cache_mb * 2**20)  # as the stage
    device = torch.device(args.device)
    load = os.getloadavg()

    start = time.perf_counter()
    fit = train_model(
        "abmil",
        args.dim,
        2,
        (train.index.tolist(), train.map(index).tolist()),
        (val.index.tolist(), val.map(index).tolist()),
        bags,
        settings,
        device,
        seed=[settings.seed, 0, 7],
    )
    train_s = time.perf_counter() - start
    model = load_state("abmil", args.dim, 2, settings.architecture(), fit.state, device)
    start = time.perf_counter()
    called = sum(int(p.argmax() == index[labels[bag.slide_id]]) for bag, p, _ in predict([model], bags, test, device))
    predict_s = time.perf_counter() - start
    epoch_s = train_s / fit.epochs_run
    data_gb = sum(f.stat().st_size for f in files) / 1e9
    result = {
        "slides": args.slides,
        "tiles_per_slide": args.tiles,
        "dim": args.dim,
        "embeddings_on_disk_gb": round(data_gb, 2),
        "embeddings_float16_in_memory_gb": round(args.slides * args.tiles * args.dim * 2 / 1e9, 2),
        "train_slides": len(train),
        "validation_slides": len(val),
        "test_slides": len(test),
        "max_train_tiles": settings.max_train_tiles,
        "threads": args.threads,
        "device": args.device,
        "epochs": fit.epochs_run,
        "epoch_s": round(epoch_s, 1),
        "epoch_ms_per_training_slide": round(1000 * epoch_s / len(rest), 1),
        "call_test_fold_s": round(predict_s, 1),
        "test_fold_accuracy": round(called / len(test), 3),
        "five_fold_estimate_s": round(5 * (epoch_s * fit.epochs_run + predict_s), 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "load_average_at_start": [round(v, 2) for v in load],
        **written,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
