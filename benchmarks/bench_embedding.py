"""Benchmark: patch embedding throughput on a synthetic slide (run by hand; prints JSON).

Three figures measured in one run, on the same tiles:
- read-only: the DataLoader alone (workers decoding tiles at the read level, uint8);
- model-only: the same batches from memory through preprocessing + the model;
- end-to-end: embed_shard (reader + model + Parquet writer), plus peak RSS.

The ceiling the end-to-end rate is judged against depends on the hardware (see DESIGN.md): with a GPU,
decoding and the model run on different hardware, ceiling = min(read, model); on a CPU-only machine they
share the cores, ceiling = 1 / (1/read + 1/model). Target: end-to-end ≥ 0.85 × ceiling.

  python benchmarks/bench_embedding.py                       # tiny model, CPU
  python benchmarks/bench_embedding.py --model ViT-B-16 --device cuda --precision bf16 --workers 16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import torch

from histoclip.demo import write_large_slide
from histoclip.embedding.embed import SlideJob, TileBatches, embed_shard, resolve_batch_size, resolve_workers
from histoclip.embedding.models import ModelSpec, load_model
from histoclip.tiling.grid import run_tiling

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def _end_to_end(job, spec, device, batch_size, workers, queue) -> None:  # noqa: ANN001 (child process)
    model = load_model(spec, device)
    start = time.perf_counter()
    report = embed_shard([job], model, batch_size=batch_size, num_workers=workers)
    queue.put((report.tiles, time.perf_counter() - start, peak_rss_mb()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "config/models/tiny-vit.json"))
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--level0-px", type=int, default=48_000, help="slide side at 0.5 µm/px")
    parser.add_argument("--min-tiles", type=int, default=20_000)
    parser.add_argument("--model-batches", type=int, default=20, help="batches held in memory for model-only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slide = tmp / "slide.tiff"
        write_large_slide(slide, level0_px=args.level0_px, mpp=0.5, tissue_fraction=0.6)
        meta = run_tiling(slide, "bench", tmp / "tiles.parquet", tmp / "qc.png")
        if meta["n_tiles"] < args.min_tiles:
            raise SystemExit(f"only {meta['n_tiles']} tiles; raise --level0-px")
        job = SlideJob.from_tile_file(tmp / "tiles.parquet", tmp / "emb" / "bench.parquet")
        spec = ModelSpec("bench", args.model, pretrained=args.pretrained, precision=args.precision)
        model = load_model(spec, args.device)
        workers = resolve_workers(args.workers, model.device)
        read_workers = workers if model.device.type == "cuda" else max(workers, torch.get_num_threads())

        # read-only: the loader alone, all tiles
        batch_size = resolve_batch_size(args.batch_size, model.device)
        dataset = TileBatches([job], batch_size)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=read_workers, pin_memory=model.device.type == "cuda"
        )
        start = time.perf_counter()
        tiles = 0
        kept = []
        for _, batch in loader:
            tiles += len(batch)
            if len(kept) < args.model_batches:
                kept.append(batch)
        read_s = time.perf_counter() - start

        # model-only: the same batches from memory, on the device, including on-device preprocessing
        for batch in kept[:2]:  # warm-up (cudnn autotune, allocator)
            model.encode_tiles(batch.to(model.device))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model_tiles = 0
        for batch in kept:
            model.encode_tiles(batch.to(model.device, non_blocking=True))
            model_tiles += len(batch)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        model_s = time.perf_counter() - start

        # end to end, in a fresh process so that its peak RSS is its own (not the batches kept above)
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_end_to_end, args=(job, spec, args.device, batch_size, workers, queue))
        child.start()
        e2e_tiles, e2e_s, e2e_rss_mb = queue.get()
        child.join()

        read_rate = tiles / read_s
        model_rate = model_tiles / model_s
        e2e_rate = e2e_tiles / e2e_s
        ceiling = (
            min(read_rate, model_rate) if model.device.type == "cuda" else 1.0 / (1.0 / read_rate + 1.0 / model_rate)
        )
        print(
            json.dumps(
                {
                    "benchmark": "patch embedding",
                    "device": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
                    "model": model.architecture,
                    "image_size": model.image_size,
                    "precision": model.provenance()["precision"],
                    "tiles": e2e_tiles,
                    "batch_size": batch_size,
                    "workers": workers,
                    "read_only_tiles_per_s": round(read_rate, 1),
                    "model_only_tiles_per_s": round(model_rate, 1),
                    "end_to_end_tiles_per_s": round(e2e_rate, 1),
                    "ceiling_tiles_per_s": round(ceiling, 1),
                    "ceiling_rule": "min(read, model)" if model.device.type == "cuda" else "serial 1/(1/read+1/model)",
                    "end_to_end_over_ceiling": round(e2e_rate / ceiling, 3),
                    "target_ratio": 0.85,
                    "end_to_end_peak_rss_mb": e2e_rss_mb,
                },
                indent=2,
            )
        )


if __name__ == "__main__":  # guard: the end-to-end child is spawned
    main()
