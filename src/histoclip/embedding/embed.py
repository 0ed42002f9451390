"""Streaming patch embedding: tiles → open_clip image embeddings → one Parquet file per slide.

Where a cohort spends its GPU hours. The usual bottleneck is not the model but feeding it, so:

- tiles are read in DataLoader worker processes, each with its own slide handles, at the pyramid level
  tiling chose, and travel as uint8 (4x less than float) in pinned memory;
- resizing and normalisation happen on the device, in the same step as the model;
- a batch never spans two slides, and one loader (one set of workers, one model load) serves a whole
  shard of slides, so the per-slide cost is a file, not a process;
- embeddings are written as Parquet row groups while a slide streams, so memory stays bounded whatever
  the slide size; the file appears at its final path only when complete (temp file + rename).

A finished slide is also kept under ``.finished/`` beside the outputs (:mod:`histoclip.resume`): after a crash
this is what lets the re-run shard skip the slides that were already done. The reuse key is in the file's own
footer: a kept file is reused only if it matches the current tile file (sha256), the model weights (sha256) and
the storage settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoclip import formats, staging, store
from histoclip.embedding.models import LoadedModel
from histoclip.errors import SlideError
from histoclip.resume import FinishedSlide, reuse_key
from histoclip.tiling.blocks import read_tiles
from histoclip.tiling.slide import ReadError, open_wsi, read_rgb, undecodable_tile_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideJob:
    """One slide of a shard: where its pixels, tiles and embeddings are, and how to read its tiles."""

    slide_id: str
    slide_path: str
    tiles_path: str
    out_path: str
    x: np.ndarray
    y: np.ndarray
    read_level: int
    read_tile_px: int
    tile_level0_px: int
    tiles_sha256: str
    status: str
    error: str

    @classmethod
    def from_tile_file(cls, tiles_path: str | Path, out_path: str | Path) -> SlideJob:
        x, y, meta = formats.read_tile_file(tiles_path)
        return cls(
            slide_id=meta["slide_id"],
            slide_path=meta["path"],
            tiles_path=str(tiles_path),
            out_path=str(out_path),
            x=x,
            y=y,
            read_level=int(meta.get("read_level", 0)),
            read_tile_px=int(meta.get("read_tile_px", 1)),
            tile_level0_px=int(meta.get("tile_level0_px", 1)),
            tiles_sha256=store.sha256_file(tiles_path),
            status=meta.get("status", "ok"),
            error=meta.get("error", ""),
        )

    def __len__(self) -> int:
        return int(self.x.size)


#: How a batch's tiles are read: "blocks" (runs of adjacent tiles per reader call, JPEG-tiled TIFFs decoded directly)
#: or "tiles" (one reader call per tile, OpenSlide's own ``read_region``: the way before, kept to compare against).
TILE_READS = ("blocks", "tiles")


class TileBatches(torch.utils.data.Dataset):
    """Item i = one batch of tiles of one slide, as uint8 NHWC; read by whichever worker gets it.

    Slide handles are opened lazily inside each worker process (they can't be shared across a fork) and kept for
    the life of the worker, so a slide is opened once per worker, not once per tile. A batch is read in blocks of
    adjacent tiles (:func:`histoclip.tiling.blocks.read_tiles`: one reader call per run of tiles, each stored tile
    decoded once) straight into a tensor allocated in shared memory, so handing it to the main process copies
    nothing (a tensor in private memory is copied into shared memory when it is sent: ~20 ms per 32 tiles of
    224 px, as long as reading them).
    """

    def __init__(self, slides: Sequence[SlideJob], batch_size: int, tile_reads: str = "blocks") -> None:
        if tile_reads not in TILE_READS:
            raise ValueError(f"tile_reads must be one of {TILE_READS}, not {tile_reads!r}")
        self.slides = list(slides)
        self.blocks = tile_reads == "blocks"
        self.items: list[tuple[int, int, int]] = []
        for index, job in enumerate(self.slides):
            for start in range(0, len(job), batch_size):
                self.items.append((index, start, min(start + batch_size, len(job))))
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _slide(self, index: int) -> Any:
        if index not in self._handles:
            job = self.slides[index]
            reader = open_wsi(job.slide_path, job.slide_id)
            if not self.blocks and hasattr(reader, "direct_tiles"):
                reader.direct_tiles = False  # every read is OpenSlide's read_region, as before block reads
            self._handles[index] = reader
            if len(self._handles) > 8:  # a shard streams slide after slide: keep only recent handles
                oldest = next(iter(self._handles))
                self._handles.pop(oldest).close()
        return self._handles[index]

    def __getitem__(self, item: int) -> tuple[int, torch.Tensor]:
        index, start, stop = self.items[item]
        job = self.slides[index]
        slide = self._slide(index)
        size = job.read_tile_px
        batch = batch_tensor((stop - start, size, size, 3))
        out = batch.numpy()
        xs, ys = job.x[start:stop], job.y[start:stop]
        if self.blocks:
            read_tiles(slide, job.slide_id, xs, ys, job.read_level, size, out)
            return item, batch
        for row, (x, y) in enumerate(zip(xs.tolist(), ys.tolist(), strict=True)):
            try:
                out[row] = read_rgb(slide, (x, y), job.read_level, (size, size))
            except ReadError as exc:
                raise undecodable_tile_error(job.slide_id, x, y, job.read_level, exc) from exc
        return item, batch


def batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a loader worker, allocated in shared memory (what sending it needs)."""
    if torch.utils.data.get_worker_info() is None or not hasattr(torch.UntypedStorage, "_new_shared"):
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def output_metadata(job: SlideJob, model: LoadedModel, dtype: str) -> dict[str, Any]:
    return {
        "slide_id": job.slide_id,
        "status": job.status,
        "error": job.error,
        "n_tiles": len(job),
        "tiles_sha256": job.tiles_sha256,
        "embedding_dtype": dtype,
        "normalised": "L2",
        "space": model.space,
        **model.provenance(),
    }


#: What an embedding file must still match to be reused, besides its number of rows: its tile file, the model and
#: the storage settings.
REUSE_FIELDS = ("tiles_sha256", "weights_sha256", "embedding_dtype", "dim", "preprocessing", "pooling")


def _embeddings_key(n_rows: int, meta: Mapping[str, Any]) -> str:
    return reuse_key({"n_rows": n_rows, **{name: meta.get(name) for name in REUSE_FIELDS}})


def _key_inside(path: Path) -> str | None:
    """The reuse key an embedding file records in its footer; None when it can't be read."""
    try:
        footer = formats.read_embedding_footer(path)
    except Exception:  # missing, truncated or not Parquet: recompute
        return None
    return _embeddings_key(footer.n_rows, footer.metadata)


def finished_slide(job: SlideJob, model: LoadedModel, dtype: str) -> FinishedSlide:
    """The slide's embedding file with the key it must match to be reused: this slide's complete embeddings for
    this tile file, model and dtype."""
    return FinishedSlide.of([job.out_path], _embeddings_key(len(job), output_metadata(job, model, dtype)), _key_inside)


class SlideWriter:
    """Streams one slide's embeddings into its embedding file; ``commit`` puts it in place (the caller keeps the
    finished file with its reuse key: :func:`finished_slide`)."""

    def __init__(self, job: SlideJob, model: LoadedModel, dtype: str, row_group_rows: int) -> None:
        self.job = job
        self.file = formats.EmbeddingFileWriter(
            job.out_path, job.x, job.y, model.dim, dtype, output_metadata(job, model, dtype), row_group_rows
        )

    def add(self, embeddings: np.ndarray) -> None:
        self.file.add(embeddings)

    def commit(self) -> None:
        self.file.commit(f"slide {self.job.slide_id!r}")

    def abort(self) -> None:
        self.file.abort()


@dataclass
class ShardReport:
    computed: list[str]
    reused: list[str]
    failed: list[str]
    tiles: int
    seconds: float


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_workers(num_workers: int | str, device: torch.device, cpus: int | None = None) -> int:
    """``auto``: on a GPU, enough decoding processes to keep it fed; on a CPU, half the cores decode and
    the other half run the model (measured on 2 cores: 1 worker + 1 torch thread is 1.4x faster than
    1 worker + 2 threads, which oversubscribes the cores)."""
    if num_workers != "auto":
        return int(num_workers)
    cpus = cpus or available_cpus()
    return min(16, max(1, cpus - 1)) if device.type == "cuda" else max(1, cpus // 2)


@contextlib.contextmanager
def cpu_threads_beside(workers: int, device: torch.device, cpus: int) -> Iterator[None]:
    """On a CPU, give torch the cores the loader's workers don't use, for the duration of the block."""
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, cpus - workers))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_batch_size(batch_size: int | str, device: torch.device) -> int:
    """``auto``: big batches feed a GPU; on a CPU small ones stay in cache and run faster per tile."""
    if batch_size != "auto":
        return int(batch_size)
    return 256 if device.type == "cuda" else 32


def embed_shard(
    jobs: Sequence[SlideJob],
    model: LoadedModel,
    *,
    batch_size: int | str = "auto",
    num_workers: int | str = "auto",
    dtype: str = "float16",
    row_group_rows: int = 16384,
    on_slide_error: str = "fail",
    log_every_s: float = 10.0,
    cpus: int | None = None,
    tile_reads: str = "blocks",
    stage_dir: str | None = None,
) -> ShardReport:
    """Embed every slide of ``jobs`` with one model load and one loader; reuse slides already finished.

    ``tile_reads`` (:data:`TILE_READS`) changes how pixels are read, never which: the embeddings are the same bytes.
    ``stage_dir`` (config ``embedding.stage_dir``): the slides still to embed are copied there first and read from
    there (:mod:`histoclip.staging`); outputs are the same bytes, errors name the slides' own files.
    """
    started = time.perf_counter()
    report = ShardReport([], [], [], 0, 0.0)
    todo: list[SlideJob] = []
    for job in jobs:
        if finished_slide(job, model, dtype).restore():
            report.reused.append(job.slide_id)
        elif job.status != "ok":
            _write_failed(job, model, dtype, job.error)
            report.failed.append(job.slide_id)
        else:
            todo.append(job)
    if report.reused:
        log.info("reusing %d finished slide(s): %s", len(report.reused), ", ".join(report.reused))
    with staging.staged([job.slide_path for job in todo], stage_dir, "embedding.stage_dir") as where:
        todo = [dataclasses.replace(job, slide_path=where[job.slide_path]) for job in todo]
        while todo:
            workers = resolve_workers(num_workers, model.device, cpus)
            with cpu_threads_beside(workers, model.device, cpus or available_cpus()):
                done, failure = _stream(
                    todo, model, batch_size, workers, dtype, row_group_rows, log_every_s, tile_reads
                )
            report.computed += [job.slide_id for job in todo[:done]]
            report.tiles += sum(len(job) for job in todo[:done])
            if failure is None:
                break
            failure = staging.unstaged(failure, where)
            failed_job = todo[done]
            if on_slide_error != "record":
                raise failure
            log.error("%s", failure)
            _write_failed(failed_job, model, dtype, str(failure))
            report.failed.append(failed_job.slide_id)
            todo = todo[done + 1 :]
    report.seconds = time.perf_counter() - started
    return report


def _write_failed(job: SlideJob, model: LoadedModel, dtype: str, error: str) -> None:
    """An empty embedding file with status "error": the slide keeps its place, the cause is kept."""
    meta = output_metadata(job, model, dtype) | {"status": "error", "error": error, "n_tiles": 0}
    formats.write_failed_embedding_file(job.out_path, model.dim, dtype, meta)


def _stream(
    jobs: Sequence[SlideJob],
    model: LoadedModel,
    batch_size: int | str,
    workers: int,
    dtype: str,
    row_group_rows: int,
    log_every_s: float,
    tile_reads: str = "blocks",
) -> tuple[int, Exception | None]:
    """Stream ``jobs`` in order; return (number of slides finished, the error that stopped it or None)."""
    dataset = TileBatches(jobs, resolve_batch_size(batch_size, model.device), tile_reads)
    cuda = model.device.type == "cuda"
    loader = _tile_loader(dataset, workers, cuda)
    remaining = {index: len(job) for index, job in enumerate(jobs)}
    writers: dict[int, SlideWriter] = {}
    finished = 0
    slide_started = time.perf_counter()
    last_log = slide_started
    iterator = iter(loader)
    try:
        while finished < len(jobs):
            if remaining[finished] == 0:  # a slide with no tiles: an empty, complete file
                SlideWriter(jobs[finished], model, dtype, row_group_rows).commit()
                finished_slide(jobs[finished], model, dtype).keep()
                finished += 1
                continue
            try:
                item, tiles = next(iterator)
            except StopIteration:
                break
            index = dataset.items[item][0]
            if index not in writers:
                writers[index] = SlideWriter(jobs[index], model, dtype, row_group_rows)
            tiles = tiles.to(model.device, non_blocking=cuda)
            writers[index].add(model.encode_tiles(tiles).cpu().numpy())
            remaining[index] -= len(tiles)
            now = time.perf_counter()
            if now - last_log >= log_every_s:
                job = jobs[index]
                done_tiles = len(job) - remaining[index]
                log.info(
                    "slide %s: %d/%d tiles, %.0f tiles/s",
                    job.slide_id,
                    done_tiles,
                    len(job),
                    done_tiles / max(now - slide_started, 1e-9),
                )
                last_log = now
            if remaining[index] == 0:
                writers.pop(index).commit()
                finished_slide(jobs[index], model, dtype).keep()
                seconds = time.perf_counter() - slide_started
                log.info(
                    "slide %s: %d tiles in %.1f s (%.0f tiles/s)",
                    jobs[index].slide_id,
                    len(jobs[index]),
                    seconds,
                    len(jobs[index]) / max(seconds, 1e-9),
                )
                finished += 1
                slide_started = time.perf_counter()
    except Exception as exc:  # a worker's error arrives here, in order: it belongs to slide `finished`
        for writer in writers.values():
            writer.abort()
        return finished, _slide_error(exc, jobs[finished])
    finally:
        del iterator
    return finished, None


def _tile_loader(dataset: TileBatches, workers: int, cuda: bool) -> torch.utils.data.DataLoader:
    """Batches of ``dataset`` in order, read by ``workers`` forked processes (pinned memory on a GPU)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        multiprocessing_context="fork" if workers and hasattr(os, "fork") else None,
    )


def _slide_error(exc: Exception, job: SlideJob) -> SlideError:
    """The error that stopped the stream, as a :class:`SlideError` of ``job`` (the slide it belongs to)."""
    if isinstance(exc, SlideError):
        return exc
    text = str(exc)
    cause = SlideError(job.slide_id, f"embedding failed: {text.strip().splitlines()[-1] if text else exc!r}")
    cause.__cause__ = exc
    return cause
