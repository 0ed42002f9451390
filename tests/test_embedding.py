"""Patch embedding: the model registry, the streaming reader/writer, sharding and resumption.

Models are tiny open_clip configs (random init, seeded) or checkpoints written here from them: no hub.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from histoclip.config import default_config
from histoclip.demo import write_pyramid_tiff
from histoclip.embedding.embed import SlideJob, embed_shard
from histoclip.embedding.models import ModelSpec, load_model, resolve_device
from histoclip.errors import InputError, SlideError
from histoclip.resume import finished_path
from histoclip.store import read_metadata, sha256_file
from histoclip.tiling.grid import TilingParams, run_tiling

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("models") / "tiny-test.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return load_model(ModelSpec("tiny", str(tiny_config), seed=1), "cpu")


def textured_slide(path, side=1024, seed=0, mpp=0.5):
    rng = np.random.default_rng(seed)
    rgb = np.full((side, side, 3), 240, np.uint8)
    tissue = rng.integers(60, 230, (side // 2, side * 3 // 4, 3), dtype=np.uint8)
    tissue[..., 1] //= 2  # pink-purple, saturated: tissue for the detector
    rgb[side // 4 : side * 3 // 4, side // 8 : side * 7 // 8] = tissue
    write_pyramid_tiff(path, rgb, mpp=mpp)
    return path


def tile_file(tmp_path, slide_id, side=1024, seed=0, tile_px=64):
    slide = textured_slide(tmp_path / f"{slide_id}.tiff", side, seed)
    tiles = tmp_path / "tiles" / f"{slide_id}.parquet"
    run_tiling(
        slide,
        slide_id,
        tiles,
        tmp_path / "qc" / f"{slide_id}.png",
        params=TilingParams.from_config(default_config({"tiling": {"tile_px": tile_px}})),
    )
    return tiles


def job_for(tiles, out_dir):
    return SlideJob.from_tile_file(tiles, out_dir / tiles.name)


# --- the registry -------------------------------------------------------------------------------------------


def test_model_provenance_and_unit_norm(tiny):
    prov = tiny.provenance()
    assert prov["dim"] == 32 and prov["architecture"] == "tiny-test"
    assert prov["weights"] == "random-init(seed=1)" and len(prov["weights_sha256"]) == 64
    assert prov["preprocessing"]["image_size"] == 64 and len(prov["preprocessing"]["mean"]) == 3
    tiles = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    embeddings = tiny.encode_tiles(tiles)
    assert embeddings.shape == (5, 32)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(5))
    # the projected space is the text space: text embeddings have the same width
    assert tiny.encode_texts(["tumour", "stroma"]).shape == (2, 32)


def test_preprocessing_matches_open_clip_normalisation(tiny):
    tiles = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    ours = tiny.preprocess_on_device(tiles)
    mean = torch.tensor(tiny.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny.std).view(1, 3, 1, 1)
    reference = (tiles.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_and_mismatch(tiny, tiny_config, tmp_path):
    import json

    from safetensors.torch import save_file

    checkpoint = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, checkpoint)
    loaded = load_model(ModelSpec("ckpt", str(tiny_config), pretrained=str(checkpoint)), "cpu")
    assert loaded.weights_sha256 == sha256_file(checkpoint)
    tiles = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    torch.testing.assert_close(loaded.encode_tiles(tiles), tiny.encode_tiles(tiles))

    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**TINY, "embed_dim": 48}))
    with pytest.raises(InputError, match=r"do not fit the architecture of model 'bad'"):
        load_model(ModelSpec("bad", str(wider), pretrained=str(checkpoint)), "cpu")


def test_local_dir_model(tiny, tmp_path):
    import json

    from safetensors.torch import save_file

    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    with pytest.raises(InputError, match="no weights file"):
        load_model(ModelSpec("loc", f"local-dir:{folder}"), "cpu")
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, folder / "open_clip_model.safetensors")
    loaded = load_model(ModelSpec("loc", f"local-dir:{folder}"), "cpu")
    tiles = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    torch.testing.assert_close(loaded.encode_tiles(tiles), tiny.encode_tiles(tiles))


def test_missing_weights_fail_fast_and_say_how_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    start = time.perf_counter()
    with pytest.raises(InputError) as err:
        load_model(ModelSpec("quilt", "hf-hub:wisdomik/QuiltNet-B-32"), "cpu")
    assert time.perf_counter() - start < 20  # offline: no minute of hub retries
    message = str(err.value)
    assert "'quilt'" in message and "Hugging Face cache" in message and "local-dir:" in message
    with pytest.raises(InputError, match="checkpoint .* does not exist"):
        load_model(ModelSpec("ckpt", "ViT-B-16", pretrained=str(tmp_path / "nope.safetensors")), "cpu")
    with pytest.raises(InputError, match="pretrained"):
        load_model(ModelSpec("tag", "ViT-B-16", pretrained="openai"), "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(InputError, match="no CUDA GPU"):
        resolve_device("cuda")


# --- the feature store ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embedded")
    tiles = tile_file(tmp, "slide-a")
    report = embed_shard([job_for(tiles, tmp / "emb")], tiny, batch_size=16, num_workers=1)
    return tiles, tmp / "emb" / "slide-a.parquet", report


def test_rows_order_norm_and_metadata(embedded, tiny):
    tiles, out, report = embedded
    tile_table = pq.read_table(tiles).to_pandas()
    table = pq.read_table(out)
    assert report.computed == ["slide-a"] and report.tiles == len(tile_table) > 30
    assert table.schema.field("embedding").type.value_type == "halffloat"
    assert table.schema.field("embedding").type.list_size == 32
    frame = table.to_pandas()
    assert frame["x"].tolist() == tile_table["x"].tolist() and frame["y"].tolist() == tile_table["y"].tolist()
    vectors = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    meta = read_metadata(out)
    assert meta["slide_id"] == "slide-a" and meta["n_tiles"] == len(tile_table)
    assert meta["model_name"] == "tiny" and meta["architecture"] == "tiny-test" and meta["dim"] == 32
    assert meta["weights_sha256"] == tiny.weights_sha256 and meta["tiles_sha256"] == sha256_file(tiles)
    assert meta["preprocessing"]["image_size"] == 64
    assert "torch" in meta["histoclip.provenance"]["versions"]
    assert pq.ParquetFile(out).metadata.num_row_groups >= 1


def test_embeddings_are_the_models_on_the_same_pixels(embedded, tiny):
    """The stored vector of a tile is the model's embedding of that tile read directly with OpenSlide."""
    import openslide

    tiles, out, _ = embedded
    meta = read_metadata(tiles)
    frame = pq.read_table(out).to_pandas()
    with openslide.OpenSlide(meta["path"]) as slide:
        x, y = int(frame["x"][3]), int(frame["y"][3])
        size = meta["read_tile_px"]
        pixels = np.asarray(slide.read_region((x, y), meta["read_level"], (size, size)))[..., :3]
    direct = tiny.encode_tiles(torch.from_numpy(pixels.copy())[None]).numpy()[0]
    np.testing.assert_allclose(frame["embedding"][3].astype(np.float32), direct, atol=2e-3)


def test_same_input_twice_gives_identical_embeddings(embedded, tiny, tmp_path):
    tiles, out, _ = embedded
    embed_shard([job_for(tiles, tmp_path)], tiny, batch_size=16, num_workers=1)  # same settings, fresh run
    first = pq.read_table(out).column("embedding").to_pylist()
    second = pq.read_table(tmp_path / tiles.name).column("embedding").to_pylist()
    assert first == second


def test_readable_by_pandas_polars_duckdb(embedded):
    import duckdb
    import pandas as pd
    import polars as pl

    _, out, report = embedded
    assert len(pd.read_parquet(out)) == report.tiles
    frame = pl.read_parquet(out)
    assert frame.height == report.tiles and frame["embedding"].dtype.size == 32
    ((count, dim),) = duckdb.sql(f"SELECT count(*), max(len(embedding)) FROM '{out}'").fetchall()
    assert (count, dim) == (report.tiles, 32)


# --- failures and resumption --------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_undecodable_tiles_name_the_slide_and_leave_no_file(shared_data, tiny, tmp_path):
    import pyarrow as pa

    from histoclip.store import write_table_atomic

    tiles = tmp_path / "tiles" / "broken.parquet"
    table = pa.table({"x": pa.array([0], pa.int64()), "y": pa.array([0], pa.int64()), "tissue": [1.0]})
    meta = {
        "slide_id": "broken",
        "path": str(shared_data / "broken" / "openslide-python-unreadable.svs"),
        "status": "ok",
        "read_level": 0,
        "read_tile_px": 16,
        "tile_level0_px": 16,
    }
    write_table_atomic(tiles, table, meta)
    good = tile_file(tmp_path, "good", side=512)
    out = tmp_path / "emb"
    with pytest.raises(SlideError) as err:
        embed_shard([job_for(good, out), job_for(tiles, out)], tiny, num_workers=1)
    assert "slide 'broken'" in str(err.value) and "Bogus marker length" in str(err.value)
    assert not (out / "broken.parquet").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["good.parquet"]  # no temp file left

    report = embed_shard([job_for(good, out), job_for(tiles, out)], tiny, num_workers=1, on_slide_error="record")
    assert report.failed == ["broken"] and report.reused == ["good"]
    assert read_metadata(out / "broken.parquet")["status"] == "error"


def test_killed_shard_recomputes_only_unfinished_slides(tiny_config, tmp_path):
    small = tile_file(tmp_path, "s1-small", side=512, tile_px=32)  # a few tiles: finishes first
    big = [tile_file(tmp_path, f"s{i}-big", side=3072, seed=i, tile_px=32) for i in (2, 3)]
    out = tmp_path / "emb"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from histoclip.embedding.embed import SlideJob, embed_shard
        from histoclip.embedding.models import ModelSpec, load_model
        model = load_model(ModelSpec("tiny", {str(tiny_config)!r}, seed=1), "cpu")
        tiles = [Path(p) for p in {[str(small), *map(str, big)]!r}]
        embed_shard([SlideJob.from_tile_file(t, Path({str(out)!r}) / t.name) for t in tiles], model,
                    batch_size=8, num_workers=1)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / small.name).exists() and time.time() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert (out / small.name).exists(), "the first slide never finished"
        os.killpg(child.pid, signal.SIGKILL)  # the job and its loader workers, mid-way through slide 2
    finally:
        child.wait()
    assert not (out / big[1].name).exists()
    (out / small.name).unlink()  # what Snakemake does to a job's outputs before re-running it

    model = load_model(ModelSpec("tiny", str(tiny_config), seed=1), "cpu")
    jobs = [job_for(t, out) for t in (small, *big)]
    report = embed_shard(jobs, model, batch_size=8, num_workers=1)
    assert report.reused[0] == "s1-small" and "s3-big" in report.computed
    assert finished_path(out / small.name).exists()

    fresh = tmp_path / "fresh"
    embed_shard([job_for(t, fresh) for t in (small, *big)], model, batch_size=8, num_workers=1)
    for tiles in (small, *big):
        resumed = pq.read_table(out / tiles.name)
        uninterrupted = pq.read_table(fresh / tiles.name)
        assert resumed.column("embedding").to_pylist() == uninterrupted.column("embedding").to_pylist()

    # a changed tile file (re-tiled slide) is not taken from the kept copy
    run_tiling(
        tmp_path / "s1-small.tiff",
        "s1-small",
        small,
        tmp_path / "qc.png",
        params=TilingParams.from_config(default_config({"tiling": {"tile_px": 16}})),
    )
    report = embed_shard([job_for(small, out)], model, batch_size=8, num_workers=1)
    assert report.computed == ["s1-small"]
