"""Benchmark: what a model backend costs beyond the model's own forward pass (run by hand; prints JSON).

For each backend (open_clip, conch, hf-clip, timm) a tiny random-init model of its architecture is saved in its
hub layout (benchmarks/backend_models.py), loaded through histoclip (``ModelSpec.from_config`` + ``load_model``) and
timed on the same batch of uint8 tiles, in the same run, the calls interleaved:

- (a) model-only: the reference package's own image forward (open_clip ``encode_image``, CONCH ``encode_image``,
  transformers ``get_image_features``, timm ``model(x)``) on an already-preprocessed float batch at the model's
  input size, the call histoclip's ``image_features`` makes;
- (c) preprocess-only: ``LoadedModel.preprocess_on_device`` on the uint8 batch (scale, normalise, resize to the
  model's input size where the tiles are another size);
- (b) histoclip: ``LoadedModel.encode_tiles`` on the uint8 batch (preprocess + forward + L2 normalisation).

Each timed round makes the three calls back to back (so under about the same load from other jobs); there are
at least ``--repeats`` rounds after a warm-up, more for a cheap model until ``--min-seconds`` have passed. The
rates (tiles/s) are each call's best round. The ratios are per round, median over rounds (more robust on a
shared machine than a quotient of best rates): ``histoclip_over_model_only`` is (b)/(a);
``histoclip_over_forward_plus_preprocess`` compares (b) with (a) and (c) done one after the other, i.e.
(t_a + t_c) / t_b: 1.0 means the backend adds nothing beyond the forward pass and the preprocessing.
``max_abs_diff`` checks that the reference module and histoclip's ``image_features`` compute the same features
on the preprocessed batch. No timed asserts.

  python benchmarks/bench_backends.py
  python benchmarks/bench_backends.py --backends timm conch --tiles 32 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from backend_models import BUILDERS

from histoclip.embedding.models import ModelSpec, load_model

MAX_ROUNDS = 30


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        call()
    return time.perf_counter() - start


def bench_backend(backend: str, tiles: torch.Tensor, repeats: int, min_seconds: float, folder: Path) -> dict:
    tiny = BUILDERS[backend](folder)
    loaded = load_model(ModelSpec.from_config(f"tiny-{backend}", tiny.entry), "cpu")
    with torch.inference_mode():
        # the batch as a package's transform hands it to the model: contiguous NCHW float at the input size
        images = loaded.preprocess_on_device(tiles).contiguous()
        max_abs_diff = (tiny.forward(images) - loaded.image_features(images)).abs().max().item()
    calls = {
        "model_only": lambda: tiny.forward(images),
        "preprocess_only": lambda: loaded.preprocess_on_device(tiles),
        "histoclip": lambda: loaded.encode_tiles(tiles),
    }
    for call in calls.values():  # warm-up
        timed(call)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    rounds = 0
    # the three calls back to back in each round, so that load from other jobs falls on all alike
    while rounds < repeats or (time.perf_counter() - start < min_seconds and rounds < MAX_ROUNDS):
        for name, call in calls.items():
            seconds[name].append(timed(call))
        rounds += 1
    best = {name: len(tiles) / min(values) for name, values in seconds.items()}
    # ratios paired within each round (the three calls back to back), median over rounds
    paired = list(zip(seconds["model_only"], seconds["preprocess_only"], seconds["histoclip"], strict=True))
    paired_over_model = statistics.median(model / ours for model, _, ours in paired)
    paired_over_serial = statistics.median((model + prep) / ours for model, prep, ours in paired)
    return {
        "architecture": loaded.architecture,
        "input_size": loaded.image_size,
        "dim": loaded.dim,
        "rounds": rounds,
        "max_abs_diff": float(f"{max_abs_diff:.2e}"),
        "model_only_tiles_per_s": round(best["model_only"], 1),
        "preprocess_only_tiles_per_s": round(best["preprocess_only"], 1),
        "histoclip_tiles_per_s": round(best["histoclip"], 1),
        "histoclip_over_model_only": round(paired_over_model, 3),
        "histoclip_over_forward_plus_preprocess": round(paired_over_serial, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--tiles", type=int, default=64, help="tiles per batch")
    parser.add_argument("--tile-px", type=int, default=224, help="tile side (uint8 RGB)")
    parser.add_argument("--repeats", type=int, default=3, help="least timed calls of each kind, after a warm-up")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=8.0,
        help=f"more rounds (up to {MAX_ROUNDS}) until a backend took this long",
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (args.tiles, args.tile_px, args.tile_px, 3), dtype=torch.uint8, generator=generator)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            try:
                results[backend] = bench_backend(backend, tiles, args.repeats, args.min_seconds, Path(tmp) / backend)
            except ImportError as exc:  # an optional package (conch, transformers, timm) not installed
                results[backend] = {"skipped": f"{type(exc).__name__}: {exc}"}
    print(
        json.dumps(
            {
                "benchmark": "model backends: histoclip encode_tiles vs the reference forward",
                "device": "cpu",
                "torch_threads": torch.get_num_threads(),
                "batch": [args.tiles, args.tile_px, args.tile_px, 3],
                "min_rounds": args.repeats,
                "load_average_1min": round(os.getloadavg()[0], 2),
                "backends": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
