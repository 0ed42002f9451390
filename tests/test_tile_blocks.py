"""Block reads of grid tiles (histoclip.tiling.blocks) and the OpenSlide reader's direct JPEG-tile path.

What a user relies on: embeddings made with block reads are the bytes that tile-by-tile OpenSlide reads give,
whatever reads the slide and at whatever level; each stored JPEG tile is decoded once; errors still name the tile.
"""

from __future__ import annotations

import json

import numpy as np
import openslide
import pyarrow.parquet as pq
import pytest
import tifffile
from bad_slides import corrupt_tiles_slide, textured_rgb
from tiny_models import TINY_OPEN_CLIP

from histoclip.config import default_config
from histoclip.demo import write_pyramid_tiff
from histoclip.embedding.embed import SlideJob, TileBatches, embed_shard
from histoclip.embedding.models import ModelSpec, load_model
from histoclip.errors import SlideError
from histoclip.formats import read_tile_file
from histoclip.tiling import slide as wsi
from histoclip.tiling.blocks import plan_blocks, read_tiles
from histoclip.tiling.grid import TilingParams, run_tiling
from histoclip.tiling.readers import tiff_tiles
from histoclip.tiling.readers.openslide_reader import OpenSlideReader


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-blocks.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    return load_model(ModelSpec("tiny", str(path), seed=1), "cpu")


def tiled(tmp_path, name, rgb, mpp, tile_px=64, overlap_px=0, downsamples=(1, 4, 16)):
    """A pyramid TIFF of ``rgb`` and its tile file (0.5 µm/px tiles of ``tile_px``)."""
    slide = tmp_path / f"{name}.tiff"
    write_pyramid_tiff(slide, rgb, mpp=mpp, downsamples=downsamples)
    tiles = tmp_path / "tiles" / f"{name}.parquet"
    settings = {"tiling": {"tile_px": tile_px, "overlap_px": overlap_px, "min_tissue_fraction": 0.3}}
    run_tiling(slide, name, tiles, tmp_path / f"{name}.png", params=TilingParams.from_config(default_config(settings)))
    return slide, tiles


def openslide_tiles(path, xs, ys, level, size):
    """Tiles as read before block reads: one openslide read_region per tile, composited onto white."""
    out = np.empty((len(xs), size, size, 3), np.uint8)
    with openslide.OpenSlide(str(path)) as slide:
        for row, (x, y) in enumerate(zip(xs.tolist(), ys.tolist(), strict=True)):
            rgba = np.asarray(slide.read_region((x, y), level, (size, size)))
            rgb = rgba[..., :3].copy()
            rgb[rgba[..., 3] == 0] = 255
            out[row] = rgb
    return out


def embedding_bytes(path):
    column = pq.read_table(path).column("embedding").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).tobytes()


# --- embeddings: blocks vs tile by tile, to the bit ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mpp", "overlap_px", "level"),
    [
        (0.5, 0, 0),  # level 0, adjacent tiles
        (0.5, 16, 0),  # overlapping tiles
        (0.125, 0, 1),  # read from a downsampled level (4×), at whole pixels
    ],
)
def test_block_reads_embed_to_the_same_bytes_as_tile_by_tile_openslide(tiny, tmp_path, mpp, overlap_px, level):
    side = 2048 if mpp == 0.5 else 4096
    slide, tiles = tiled(tmp_path, "s", textured_rgb(side), mpp, overlap_px=overlap_px)
    x, y, meta = read_tile_file(tiles)
    assert meta["read_level"] == level and len(x) > 40

    # the pixels: every batch equals the tile-by-tile OpenSlide reads, byte for byte
    job = SlideJob.from_tile_file(tiles, tmp_path / "unused.parquet")
    batches = TileBatches([job], 16)
    blocks = np.concatenate([batches[i][1].numpy() for i in range(len(batches))])
    np.testing.assert_array_equal(blocks, openslide_tiles(slide, x, y, level, meta["read_tile_px"]))
    reader = batches._handles[0]
    assert reader.direct_levels == {level: True}  # the JPEG tiles were decoded directly, after the check

    # the embeddings, through the whole loader (a worker process, shared-memory batches)
    for reads in ("blocks", "tiles"):
        embed_shard(
            [SlideJob.from_tile_file(tiles, tmp_path / reads / "s.parquet")],
            tiny,
            batch_size=16,
            num_workers=1,
            tile_reads=reads,
        )
    assert embedding_bytes(tmp_path / "blocks" / "s.parquet") == embedding_bytes(tmp_path / "tiles" / "s.parquet")


def test_tiles_between_pixels_of_a_downsampled_level_are_read_as_openslide_resamples_them(tmp_path):
    # 0.23 µm/px, 0.5 µm/px tiles: 139 level-0 px each; read from level 1 (2×), every other tile starts between pixels
    slide, tiles = tiled(tmp_path, "odd", textured_rgb(2048), 0.23, downsamples=(1, 2, 8))
    x, y, meta = read_tile_file(tiles)
    assert meta["read_level"] == 1 and meta["tile_level0_px"] == 139 and meta["read_tile_px"] == 70
    with wsi.open_wsi(slide, "odd") as reader:
        plan = plan_blocks(reader, x, y, 1, 70)
        assert any(block.stop - block.start == 1 and block.location[0] % 2 for block in plan)
        out = np.empty((len(x), 70, 70, 3), np.uint8)
        read_tiles(reader, "odd", x, y, 1, 70, out)
    np.testing.assert_array_equal(out, openslide_tiles(slide, x, y, 1, 70))


# --- every reader ----------------------------------------------------------------------------------------------


def per_tile(reader, xs, ys, level, size):
    return np.stack([reader.read_rgb((int(a), int(b)), level, (size, size)) for a, b in zip(xs, ys, strict=True)])


def grid(step, count, origin=0):
    """Row-major tile positions: ``count`` × ``count`` tiles ``step`` apart, with gaps (every 5th tile missing)."""
    ys, xs = np.meshgrid(np.arange(count) * step + origin, np.arange(count) * step + origin, indexing="ij")
    keep = (np.arange(count * count) % 5) != 3
    return xs.ravel()[keep].astype(np.int64), ys.ravel()[keep].astype(np.int64)


@pytest.mark.shared_data
def test_every_reader_reads_blocks_as_it_reads_tiles(shared_data, tmp_path):
    from test_readers import BOXES_DICOM, JPEG_LS_LOSSLESS, wsi_dicom

    rgb = textured_rgb(1536, seed=3)
    files = {}
    files["openslide"] = tmp_path / "p.tiff"
    write_pyramid_tiff(files["openslide"], rgb, mpp=0.5)
    files["tifffile"] = tmp_path / "s.tif"
    tifffile.imwrite(files["tifffile"], rgb, photometric="rgb", rowsperstrip=64, compression="jpeg", metadata=None)
    template = shared_data.joinpath(*BOXES_DICOM)
    files["pydicom-frames"] = wsi_dicom(tmp_path / "f" / "f.dcm", rgb, template, frame=256)
    files["wsidicom"] = wsi_dicom(
        tmp_path / "w" / "w.dcm",
        rgb,
        template,
        frame=256,
        syntax=JPEG_LS_LOSSLESS,
        image_type=True,
        pixel_spacing_mm=0.0005,
    )
    try:
        import pylibCZIrw.czi as pyczi
    except ImportError:
        pyczi = None
    if pyczi is not None:
        files["pylibczirw"] = tmp_path / "c.czi"
        with pyczi.create_czi(str(files["pylibczirw"]), exist_ok=True) as writer:
            for top in range(0, 1536, 512):
                for left in range(0, 1536, 512):
                    part = np.ascontiguousarray(rgb[top : top + 512, left : left + 512, ::-1])
                    writer.write(data=part, plane={"C": 0, "T": 0, "Z": 0}, location=(left, top))
    for name, path in files.items():
        with wsi.open_wsi(path, name) as reader:
            assert reader.name == name
            ds = round(reader.level_downsamples[1])
            for level, step, size in ((0, 100, 100), (0, 90, 100), (1, 50 * ds, 50)):  # adjacent, overlapping, level 1
                xs, ys = grid(step, 12, origin=36)
                blocks = plan_blocks(reader, xs, ys, level, size)
                assert len(blocks) < len(xs) / 2, name  # several tiles per reader call
                out = np.empty((len(xs), size, size, 3), np.uint8)
                read_tiles(reader, name, xs, ys, level, size, out)
                np.testing.assert_array_equal(out, per_tile(reader, xs, ys, level, size), err_msg=f"{name} {level}")


# --- the direct JPEG-tile path ---------------------------------------------------------------------------------


def test_each_stored_jpeg_tile_is_decoded_once(tmp_path):
    slide, tiles = tiled(tmp_path, "once", textured_rgb(4096), 0.5, tile_px=224)
    x, y, meta = read_tile_file(tiles)
    size = meta["read_tile_px"]
    under = {
        (row, col)
        for a, b in zip(x, y, strict=True)
        for row in range(b // 256, (b + size - 1) // 256 + 1)
        for col in range(a // 256, (a + size - 1) // 256 + 1)
    }
    with wsi.open_wsi(slide, "once") as reader:
        out = np.empty((32, size, size, 3), np.uint8)
        for start in range(0, len(x), 32):  # batch by batch, as the loader reads them
            part = slice(start, min(start + 32, len(x)))
            read_tiles(reader, "once", x[part], y[part], 0, size, out[: part.stop - part.start])
        decoded = reader._decoder.decoded
        # a second slide open in the same process: the decoded tiles of both stay within one budget
        other, _ = tiled(tmp_path, "other", textured_rgb(4096, seed=5), 0.5, tile_px=224)
        with wsi.open_wsi(other, "other") as second:
            second.read_rgb((0, 0), 0, (4096, 4096))
            assert second._decoder.decoded == 256 and tiff_tiles.CACHE.nbytes <= tiff_tiles.CACHE_BYTES
    assert len(x) > 100
    # the check against OpenSlide decodes one tile more; a tile-by-tile read would decode ~1.9 per grid tile
    assert decoded <= len(under) + 1 < 1.5 * len(x)


@pytest.mark.shared_data
def test_aperio_jpeg_tiles_are_decoded_directly_and_match_openslide(shared_data):
    path = shared_data / "svs" / "CMU-1-Small-Region.svs"
    with OpenSlideReader(path) as reader, openslide.OpenSlide(str(path)) as reference:
        region = reader.read_rgb((1000, 1500), 0, (700, 500))
        assert reader.direct_levels == {0: True}
        np.testing.assert_array_equal(region, np.asarray(reference.read_region((1000, 1500), 0, (700, 500)))[..., :3])
        # partly outside the slide: white there, as OpenSlide's transparent pixels composited onto white
        edge = reader.read_rgb((2000, 2900), 0, (400, 200))
        rgba = np.asarray(reference.read_region((2000, 2900), 0, (400, 200)))
    assert (rgba[67:, :, 3] == 0).all() and (rgba[:, 220:, 3] == 0).all() and (rgba[:67, :220, 3] == 255).all()
    assert (edge[67:] == 255).all() and (edge[:, 220:] == 255).all()
    np.testing.assert_array_equal(edge[:67, :220], rgba[:67, :220, :3])


def test_openslide_reads_without_the_direct_path_are_the_old_bytes(tmp_path):
    path = tmp_path / "p.tiff"
    write_pyramid_tiff(path, textured_rgb(1024), mpp=0.5)
    with OpenSlideReader(path, direct_tiles=False) as reader, openslide.OpenSlide(str(path)) as reference:
        alphas = set()
        # inside; partly outside; between pixels of level 1; between pixels across its edge (partly transparent)
        for location, level, size in (
            ((100, 200), 0, (300, 300)),
            ((-50, 900), 0, (200, 200)),
            ((401, 3), 1, (64, 64)),
            ((966, 966), 1, (20, 20)),
        ):
            rgba = np.asarray(reference.read_region(location, level, size))
            old = rgba[..., :3].copy()
            old[rgba[..., 3] == 0] = 255
            np.testing.assert_array_equal(reader.read_rgb(location, level, size), old)
            alphas |= set(np.unique(rgba[..., 3]).tolist())
        assert not any(reader.direct_levels.values())
    assert {0, 255} < alphas and len(alphas) > 2


def test_lzw_tiled_levels_are_left_to_openslide(tmp_path):
    path = tmp_path / "lzw.tiff"
    tifffile.imwrite(path, textured_rgb(1024), tile=(256, 256), photometric="rgb", compression="lzw", metadata=None)
    with OpenSlideReader(path) as reader, openslide.OpenSlide(str(path)) as reference:
        region = reader.read_rgb((300, 300), 0, (300, 300))
        assert reader.direct_levels == {0: False}
        np.testing.assert_array_equal(region, np.asarray(reference.read_region((300, 300), 0, (300, 300)))[..., :3])


def test_a_corrupt_tile_in_a_block_still_names_a_tile_of_the_slide(tiny, tmp_path):
    slide = corrupt_tiles_slide(tmp_path / "bad.tiff", rows=(4,))
    tiles = tmp_path / "bad.parquet"
    run_tiling(slide, "bad", tiles, tmp_path / "bad.png", qc_thumbnail_px=256)  # QC from level 1, intact
    with pytest.raises(SlideError) as err:
        embed_shard([SlideJob.from_tile_file(tiles, tmp_path / "emb" / "bad.parquet")], tiny, num_workers=1)
    message = str(err.value)
    assert message.startswith("slide 'bad': ") and "cannot be decoded" in message and "Corrupt JPEG data" in message
    y = int(message.split("tile at level-0 x=")[1].split("y=")[1].split(" ")[0])
    assert y + 224 > 4 * 256 and y < 5 * 256  # a tile over the corrupt row of stored tiles (row 4)
    assert not (tmp_path / "emb" / "bad.parquet").exists()


def test_a_tile_libjpeg_decodes_with_only_a_warning_fails_as_openslide_fails_it(tmp_path):
    """One byte of a JPEG tile turned into a marker byte: imagecodecs decodes the tile (libjpeg warns, and returns
    pixels), OpenSlide refuses it; the reader refuses it as OpenSlide does, with OpenSlide's message."""
    path = tmp_path / "flipped.tiff"
    write_pyramid_tiff(path, textured_rgb(1024), mpp=0.5)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = int(page.dataoffsets[5]), int(page.databytecounts[5])  # row 1, column 1 of 256-px tiles
        data[offset + 6982] = 0xFF
        assert page.decode(bytes(data[offset : offset + count]), 5)[0].shape == (1, 256, 256, 3)  # silently
    path.write_bytes(bytes(data))
    with OpenSlideReader(path) as reader:
        assert reader.read_rgb((600, 600), 0, (100, 100)).shape == (100, 100, 3)  # an intact tile: read directly
        assert reader.direct_levels == {0: True}
        with pytest.raises(wsi.ReadError, match="Corrupt JPEG data: premature end of data segment"):
            reader.read_rgb((300, 300), 0, (100, 100))
