"""Benchmark: patch embedding throughput against the decode limit, on a synthetic slide (run by hand; prints JSON).

Measured in one run, on the same tiles of the same slide:
- raw: OpenSlide's own ``read_region``, one tile per call, in as many processes as the loader has workers (each
  process a contiguous share of the tiles: the most cache-friendly order for OpenSlide). The decode limit an
  honest ceiling is built on (DESIGN.md, "Measuring speed honestly");
- read-only: the DataLoader alone (workers reading tiles at the read level, uint8), with block reads
  (``tile_reads="blocks"``, what the workflow does) and, for comparison, one reader call per tile (``"tiles"``);
- model-only: the same batches from memory through preprocessing + the model;
- end-to-end: embed_shard (reader + model + Parquet writer), plus peak RSS.

Ceilings: with a GPU, decoding and the model run on different hardware, ceiling = min(read, model); on a
CPU-only machine they share the cores, ceiling = 1 / (1/read + 1/model). Both are given from the raw rate (the
honest one: targets read-only ≥ 1.0 × raw, end-to-end ≥ 0.85 × the raw-based ceiling) and from the reader's own.
The machine's load average is printed before and after: these machines are shared, so compare ratios of one run.

  python benchmarks/bench_embedding.py --level0-px 30000 --min-tiles 9000     # tiny model, CPU (~9,400 tiles)
  python benchmarks/bench_embedding.py --model ViT-B-16 --device cuda --precision bf16 --workers 16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
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


def load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _end_to_end(job, spec, device, batch_size, workers, queue) -> None:  # noqa: ANN001 (child process)
    model = load_model(spec, device)
    start = time.perf_counter()
    report = embed_shard([job], model, batch_size=batch_size, num_workers=workers)
    queue.put((report.tiles, time.perf_counter() - start, peak_rss_mb()))


def _raw_share(path, xs, ys, level, size, barrier, queue) -> None:  # noqa: ANN001 (child process)
    import openslide

    slide = openslide.OpenSlide(str(path))
    barrier.wait()
    start = time.perf_counter()
    for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
        slide.read_region((x, y), level, (size, size))
    queue.put((start, time.perf_counter(), len(xs)))


def raw_read_region(job: SlideJob, processes: int) -> float:
    """Tiles/s of plain ``openslide.OpenSlide.read_region``, one tile per call, ``processes`` at once."""
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(processes), context.Queue()
    shares = np.array_split(np.arange(len(job)), processes)
    children = [
        context.Process(
            target=_raw_share,
            args=(job.slide_path, job.x[share], job.y[share], job.read_level, job.read_tile_px, barrier, queue),
        )
        for share in shares
    ]
    for child in children:
        child.start()
    results = [queue.get() for _ in children]
    for child in children:
        child.join()
    start, stop = min(r[0] for r in results), max(r[1] for r in results)
    return sum(r[2] for r in results) / (stop - start)


def read_only(job: SlideJob, batch_size: int, workers: int, cuda: bool, tile_reads: str, keep: int) -> tuple:
    """(tiles/s of the loader alone, the first ``keep`` batches)."""
    loader = torch.utils.data.DataLoader(
        TileBatches([job], batch_size, tile_reads),
        batch_size=None,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=4,
        multiprocessing_context="fork",
    )
    start = time.perf_counter()
    tiles, kept = 0, []
    for _, batch in loader:
        tiles += len(batch)
        if len(kept) < keep:
            kept.append(batch.clone())
    return tiles / (time.perf_counter() - start), kept


def model_only(model, kept: list[torch.Tensor], threads: int, cuda: bool) -> float:  # noqa: ANN001
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in kept[:2]:  # warm-up (cudnn autotune, allocator)
            model.encode_tiles(batch.to(model.device))
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        tiles = 0
        for batch in kept:
            model.encode_tiles(batch.to(model.device, non_blocking=True))
            tiles += len(batch)
        if cuda:
            torch.cuda.synchronize()
        return tiles / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def ceiling(read_rate: float, model_rate: float, cuda: bool) -> float:
    return min(read_rate, model_rate) if cuda else 1.0 / (1.0 / read_rate + 1.0 / model_rate)


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
    parser.add_argument("--skip-tile-reads", action="store_true", help="don't measure the one-call-per-tile reader")
    args = parser.parse_args()
    load_before = load()

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
        cuda = model.device.type == "cuda"
        workers = resolve_workers(args.workers, model.device)
        read_workers = workers if cuda else max(workers, torch.get_num_threads())
        batch_size = resolve_batch_size(args.batch_size, model.device)

        raw_rate = raw_read_region(job, read_workers)
        read_rate, kept = read_only(job, batch_size, read_workers, cuda, "blocks", args.model_batches)
        tile_rate = None
        if not args.skip_tile_reads:
            tile_rate, _ = read_only(job, batch_size, read_workers, cuda, "tiles", 0)

        # model-only: the same batches from memory, on the device, including on-device preprocessing. On a CPU with
        # all its threads and with one: on a shared, oversubscribed machine OpenMP's spinning threads can collapse
        # (measured at load 14 on 2 cores: 30 tiles/s with 2 threads, 230 with 1); the better is the model's rate
        thread_counts = [torch.get_num_threads()] if cuda else sorted({torch.get_num_threads(), 1}, reverse=True)
        model_rates = {threads: model_only(model, kept, threads, cuda) for threads in thread_counts}
        model_rate = max(model_rates.values())

        # end to end, in a fresh process so that its peak RSS is its own (not the batches kept above)
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_end_to_end, args=(job, spec, args.device, batch_size, workers, queue))
        child.start()
        e2e_tiles, e2e_s, e2e_rss_mb = queue.get()
        child.join()
        e2e_rate = e2e_tiles / e2e_s

        raw_ceiling = ceiling(raw_rate, model_rate, cuda)
        own_ceiling = ceiling(read_rate, model_rate, cuda)
        print(
            json.dumps(
                {
                    "benchmark": "patch embedding",
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "cpus": len(os.sched_getaffinity(0)),
                    "load_average_before": load_before,
                    "load_average_after": load(),
                    "model": model.architecture,
                    "image_size": model.image_size,
                    "precision": model.provenance()["precision"],
                    "slide_level0_px": args.level0_px,
                    "tiles": e2e_tiles,
                    "batch_size": batch_size,
                    "workers": workers,
                    "read_workers": read_workers,
                    "raw_read_region_tiles_per_s": round(raw_rate, 1),
                    "read_only_tiles_per_s": round(read_rate, 1),
                    "read_only_one_call_per_tile_tiles_per_s": round(tile_rate, 1) if tile_rate else None,
                    "model_only_tiles_per_s": round(model_rate, 1),
                    "model_only_tiles_per_s_by_threads": {str(t): round(r, 1) for t, r in model_rates.items()},
                    "end_to_end_tiles_per_s": round(e2e_rate, 1),
                    "ceiling_rule": "min(read, model)" if cuda else "serial 1/(1/read+1/model)",
                    "read_only_over_raw": round(read_rate / raw_rate, 3),
                    "raw_ceiling_tiles_per_s": round(raw_ceiling, 1),
                    "end_to_end_over_raw_ceiling": round(e2e_rate / raw_ceiling, 3),
                    "own_ceiling_tiles_per_s": round(own_ceiling, 1),
                    "end_to_end_over_own_ceiling": round(e2e_rate / own_ceiling, 3),
                    "targets": {"read_only_over_raw": 1.0, "end_to_end_over_raw_ceiling": 0.85},
                    "end_to_end_peak_rss_mb": e2e_rss_mb,
                    **(
                        {}
                        if cuda
                        else {"gpu": "not measured: no GPU here (benchmarks/gpu_embedding.sh runs it on a GPU)"}
                    ),
                },
                indent=2,
            )
        )


if __name__ == "__main__":  # guard: the end-to-end child is spawned
    main()
