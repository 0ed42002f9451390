"""Benchmark: per-slide overhead when a cohort of small slides is embedded as one shard (prints JSON).

50 small synthetic slides are tiled, then embedded by one embed_shard call (one model load, one loader).
Compared, in the same run, with the model-only time of the same tiles (batches from memory) and with the
hardware ceiling (see bench_embedding.py). Target: cohort time ≤ 1.3 × summed model-only time where the
model has its own hardware (GPU); on a CPU-only machine decoding shares the cores, so the comparable figure
is cohort time over the serial ceiling's time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from histoclip.demo import make_demo_cohort
from histoclip.embedding.embed import SlideJob, TileBatches, embed_shard, resolve_batch_size, resolve_workers
from histoclip.embedding.models import ModelSpec, load_model
from histoclip.tiling.grid import run_tiling

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slides", type=int, default=50)
    parser.add_argument("--model", default=str(REPO / "config/models/tiny-vit.json"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cohort = make_demo_cohort(tmp / "cohort", n_patients=args.slides, extra_slides=0, slide_px=1536)
        jobs = []
        for slide in sorted((cohort.root / "slides").glob("*.tiff")):
            tiles = tmp / "tiles" / f"{slide.stem}.parquet"
            run_tiling(slide, slide.stem, tiles, tmp / "qc" / f"{slide.stem}.png")
            jobs.append(SlideJob.from_tile_file(tiles, tmp / "emb" / tiles.name))
        model = load_model(ModelSpec("bench", args.model), args.device)
        batch_size = resolve_batch_size("auto", model.device)
        workers = resolve_workers("auto", model.device)
        n_tiles = sum(len(job) for job in jobs)

        batches = [b for _, b in torch.utils.data.DataLoader(TileBatches(jobs, batch_size), batch_size=None)]
        start = time.perf_counter()
        for _, _batch in torch.utils.data.DataLoader(TileBatches(jobs, batch_size), batch_size=None, num_workers=2):
            pass
        read_s = time.perf_counter() - start
        model.encode_tiles(batches[0].to(model.device))
        start = time.perf_counter()
        for batch in batches:
            model.encode_tiles(batch.to(model.device))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        model_s = time.perf_counter() - start

        start = time.perf_counter()
        report = embed_shard(jobs, model, batch_size=batch_size, num_workers=workers)
        cohort_s = time.perf_counter() - start
        ceiling_s = max(read_s, model_s) if model.device.type == "cuda" else read_s + model_s
        print(
            json.dumps(
                {
                    "benchmark": "cohort embedding overhead",
                    "device": model.device.type,
                    "slides": len(jobs),
                    "tiles": n_tiles,
                    "computed": len(report.computed),
                    "read_only_s": round(read_s, 2),
                    "model_only_s": round(model_s, 2),
                    "cohort_s": round(cohort_s, 2),
                    "cohort_over_model_only": round(cohort_s / model_s, 3),
                    "cohort_over_ceiling": round(cohort_s / ceiling_s, 3),
                    "ceiling_rule": "max(read, model)" if model.device.type == "cuda" else "read + model (shared CPU)",
                    "target": "≤ 1.3",
                    "per_slide_overhead_ms": round(1000 * max(0.0, cohort_s - ceiling_s) / len(jobs), 1),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
