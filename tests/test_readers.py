"""Slide readers beyond OpenSlide, and the diagnoses for files no reader opens.

Each format is proved on a file with the property that made OpenSlide reject it in a real cohort:
- a VL Whole Slide Microscopy H&E DICOM of JPEG-baseline frames (500 × 500, row by row) without the ImageType
  attribute and without PixelSpacing (OpenSlide: "Couldn't get image flavor"; wsidicom: "Level files not found");
- a DICOM WSI in JPEG-LS (OpenSlide: unsupported transfer syntax; wsidicom reads it);
- untiled (stripped) RGB TIFFs and a stripped OME-TIFF;
- a Zeiss CZI (pylibCZIrw, the optional extra ``czi``).
Their pixels come from the real Aperio H&E CMU-1-Small-Region.svs, so tiling the converted file can be compared
with tiling the original read by OpenSlide.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import replace
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pydicom
import pytest
import tifffile
from bad_slides import plain_png, textured_rgb

from histoclip import cli
from histoclip.config import default_config
from histoclip.errors import SlideError
from histoclip.formats import read_tile_file
from histoclip.preflight.slides import SlideSettings, check_slide
from histoclip.sheets import SlideRecord
from histoclip.tiling import slide as wsi
from histoclip.tiling.convert import convert_to_pyramid_tiff
from histoclip.tiling.grid import TilingParams, run_tiling, tile_slide
from histoclip.tiling.readers import base

CMU = ("svs", "CMU-1-Small-Region.svs")
CMU_MPP = 0.499
BOXES_DICOM = ("synthetic", "openslide-python-boxes-dicom", "openslide-python-boxes_0.dcm")
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


@pytest.fixture(scope="module")
def cmu_rgb(shared_data) -> np.ndarray:
    with openslide.OpenSlide(str(shared_data.joinpath(*CMU))) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3].copy()


def wsi_dicom(
    path: Path,
    rgb: np.ndarray,
    template: Path,
    *,
    frame: int = 500,
    syntax: str = JPEG_BASELINE,
    image_type: bool = False,
    pixel_spacing_mm: float | None = None,
) -> Path:
    """A single-instance VL Whole Slide Microscopy DICOM of ``rgb``: TILED_FULL frames row by row."""
    ds = pydicom.dcmread(template)
    height, width = rgb.shape[:2]
    across, down = -(-width // frame), -(-height // frame)
    frames = []
    for row in range(down):
        for col in range(across):
            tile = np.full((frame, frame, 3), 255, np.uint8)
            part = rgb[row * frame : (row + 1) * frame, col * frame : (col + 1) * frame]
            tile[: part.shape[0], : part.shape[1]] = part
            if syntax == JPEG_BASELINE:
                frames.append(
                    imagecodecs.jpeg8_encode(
                        tile, level=90, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 1)
                    )
                )
            else:
                frames.append(imagecodecs.jpegls_encode(tile))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PhotometricInterpretation = "YBR_FULL_422" if syntax == JPEG_BASELINE else "RGB"
    ds.Rows, ds.Columns = frame, frame
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.NumberOfFrames = len(frames)
    ds.PixelData = pydicom.encaps.encapsulate(frames)
    ds["PixelData"].VR = "OB"
    if not image_type:
        del ds.ImageType
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    if pixel_spacing_mm is None:
        del measures.PixelSpacing
    else:
        measures.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- DICOM ---------------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_dicom_without_image_type_tiles_like_the_original_slide(shared_data, cmu_rgb, tmp_path):
    path = wsi_dicom(tmp_path / "he" / "he.dcm", cmu_rgb, shared_data.joinpath(*BOXES_DICOM))
    assert "ImageType" not in pydicom.dcmread(path, stop_before_pixels=True)
    assert pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames == 30  # 5 × 6 frames of 500²
    with pytest.raises(openslide.OpenSlideError, match="Couldn't get image flavor"):
        openslide.OpenSlide(str(path))
    from wsidicom import WsiDicom

    with pytest.raises(Exception, match="Level files not found"):
        WsiDicom.open(path)

    with wsi.open_wsi(path, "he") as slide:
        assert (slide.name, slide.vendor, slide.dimensions) == ("pydicom-frames", "dicom", (2220, 2967))
        region = wsi.read_rgb(slide, (700, 900), 0, (600, 600))  # spans four frames
    # JPEG at quality 90 alone costs ~4.7 grey levels on this H&E; a region one pixel off differs by ~14
    assert (
        mean_abs_diff(region, cmu_rgb[900:1500, 700:1300]) < 6 < 10 < mean_abs_diff(region, cmu_rgb[900:1500, 701:1301])
    )

    with pytest.raises(SlideError) as err:  # no PixelSpacing: the sheet must give the mpp
        tile_slide(path, "he")
    assert str(err.value) == (
        "slide 'he': has no usable microns-per-pixel (mpp): none in the DICOM metadata, the TIFF resolution tags or "
        "the objective power Fix: add an 'mpp' column to the cohort sheet with this slide's level-0 µm/px (e.g. 0.25 "
        "for 40x, 0.5 for 20x)"
    )
    meta = run_tiling(path, "he", tmp_path / "he.parquet", tmp_path / "he.png", sheet_mpp=CMU_MPP)
    original = run_tiling(shared_data.joinpath(*CMU), "cmu", tmp_path / "cmu.parquet", tmp_path / "cmu.png")
    assert meta["reader"] == "pydicom-frames" and original["reader"] == "openslide"
    x, y, _ = read_tile_file(tmp_path / "he.parquet")
    x0, y0, _ = read_tile_file(tmp_path / "cmu.parquet")
    same = set(zip(x.tolist(), y.tolist(), strict=True)) & set(zip(x0.tolist(), y0.tolist(), strict=True))
    assert original["n_tiles"] > 40 and len(same) >= 0.97 * original["n_tiles"]
    assert abs(meta["n_tiles"] - original["n_tiles"]) <= 0.03 * original["n_tiles"]


@pytest.mark.shared_data
def test_dicom_mpp_from_pixel_spacing(shared_data, cmu_rgb, tmp_path):
    path = wsi_dicom(
        tmp_path / "d" / "s.dcm", cmu_rgb[:1000, :1000], shared_data.joinpath(*BOXES_DICOM), pixel_spacing_mm=0.000499
    )
    tiling = tile_slide(path, "s")
    assert tiling.mpp == pytest.approx(0.499) and tiling.mpp_source == "dicom-metadata"


@pytest.mark.shared_data
def test_jpeg_ls_dicom_openslide_rejects_is_read_by_wsidicom(shared_data, tmp_path):
    template = shared_data.joinpath(*BOXES_DICOM)
    with openslide.OpenSlide(str(template)) as original:
        expected = np.asarray(original.read_region((0, 0), 0, (16, 16)))[..., :3]
    path = wsi_dicom(
        tmp_path / "jls" / "boxes.dcm",
        pydicom.dcmread(template).pixel_array[:16, :16],
        template,
        frame=16,
        syntax=JPEG_LS_LOSSLESS,
        image_type=True,
        pixel_spacing_mm=0.000499,
    )
    with pytest.raises(openslide.OpenSlideError, match="Unsupported transfer syntax"):
        openslide.OpenSlide(str(path))
    with wsi.open_wsi(path, "jls") as slide:
        assert slide.name == "wsidicom"
        np.testing.assert_array_equal(wsi.read_rgb(slide, (0, 0), 0, (16, 16)), expected)  # lossless
    tiny_tiles = replace(TilingParams.from_config(default_config()), tile_px=4, min_tissue_fraction=0.0)
    tiling = tile_slide(path, "jls", params=tiny_tiles, tissue_params=None)  # 16×16 px: smaller than a default tile
    assert tiling.mpp == pytest.approx(0.499) and tiling.mpp_source == "dicom-metadata"


# --- TIFF ---------------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize("compression", [None, "zlib", "jpeg"])
def test_stripped_tiff_is_read_and_tiled(shared_data, cmu_rgb, tmp_path, compression):
    path = tmp_path / "strips.tif"
    px_per_cm = 1e4 / CMU_MPP
    tifffile.imwrite(
        path,
        cmu_rgb,
        photometric="rgb",
        rowsperstrip=64,
        compression=compression,
        resolution=(px_per_cm, px_per_cm),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    with pytest.raises(openslide.OpenSlideUnsupportedFormatError):
        openslide.OpenSlide(str(path))
    with wsi.open_wsi(path, "strips") as slide:
        assert slide.name == "tifffile" and slide.level_count >= 3  # level 0 + virtual halvings
        region = wsi.read_rgb(slide, (-10, 2950), 0, (100, 100))  # partly outside: white there
        assert (region[:, :10] == 255).all() and (region[17:] == 255).all()
        inside = region[:17, 10:]
    if compression != "jpeg":
        np.testing.assert_array_equal(inside, cmu_rgb[2950:, :90])
    meta = run_tiling(path, "strips", tmp_path / "t.parquet", tmp_path / "q.png")
    original = run_tiling(shared_data.joinpath(*CMU), "cmu", tmp_path / "c.parquet", tmp_path / "c.png")
    assert meta["reader"] == "tifffile" and meta["mpp_source"] == "tiff-resolution"
    assert abs(meta["n_tiles"] - original["n_tiles"]) <= 0.02 * original["n_tiles"]


def test_stripped_tiff_tissue_level_is_read_with_bounded_memory(tmp_path):
    side = 4096  # 4096 × 8192 px: 96 MiB of RGB
    rgb = np.tile(textured_rgb(512), (2 * side // 512, side // 512, 1))
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", rowsperstrip=16, compression="zlib", metadata=None)
    del rgb
    with wsi.open_wsi(path, "big") as slide:
        level = wsi.nearest_level(slide, 0.5, 8.0)  # the coarsest virtual level: 1024 px on its longest side
        assert slide.level_downsamples[level] == 8
        tracemalloc.start()
        low = wsi.read_level_rgb(slide, level, "big")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert low.shape == (1024, 512, 3)
    np.testing.assert_array_equal(low[:64, :64], base.area_average(textured_rgb(512), 8))
    # a band of strips and its average at a time, never the image: 2 × 16 MiB measured, against 96 MiB
    assert peak < base.BAND_BYTES * 2.5 < 2 * side * side * 3 / 2


def test_stripped_ome_tiff_mpp_from_ome_metadata(tmp_path):
    path = tmp_path / "s.ome.tif"
    tifffile.imwrite(
        path,
        textured_rgb(1024),
        photometric="rgb",
        rowsperstrip=32,
        ome=True,
        metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
    )
    with wsi.open_wsi(path, "ome") as slide:
        assert (slide.name, slide.vendor) == ("tifffile", "ome-tiff")
    tiling = tile_slide(path, "ome")
    assert tiling.mpp == pytest.approx(0.25) and tiling.mpp_source == "ome-metadata" and len(tiling.grid) > 0


# --- CZI ----------------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_czi_is_read_with_pylibczirw(shared_data, cmu_rgb, tmp_path):
    pyczi = pytest.importorskip("pylibCZIrw.czi", reason="CZI support is the optional extra histoclip[czi]")
    path = tmp_path / "cmu.czi"
    with pyczi.create_czi(str(path), exist_ok=True) as writer:
        for y in range(0, cmu_rgb.shape[0], 1024):  # written as subblocks, like a scanner's tiles
            for x in range(0, cmu_rgb.shape[1], 1024):
                block = np.ascontiguousarray(cmu_rgb[y : y + 1024, x : x + 1024, ::-1])
                writer.write(data=block, plane={"C": 0, "T": 0, "Z": 0}, location=(x, y))
        writer.write_metadata(
            document_name="cmu", channel_names={0: "TL"}, scale_x=CMU_MPP * 1e-6, scale_y=CMU_MPP * 1e-6
        )
    with wsi.open_wsi(path, "czi") as slide:
        assert (slide.name, slide.dimensions) == ("pylibczirw", (2220, 2967))
        np.testing.assert_array_equal(wsi.read_rgb(slide, (1000, 1000), 0, (300, 300)), cmu_rgb[1000:1300, 1000:1300])
    meta = run_tiling(path, "czi", tmp_path / "t.parquet", tmp_path / "q.png")
    original = run_tiling(shared_data.joinpath(*CMU), "cmu", tmp_path / "c.parquet", tmp_path / "c.png")
    assert meta["reader"] == "pylibczirw" and meta["mpp_source"] == "czi-metadata"
    assert meta["level0_mpp"] == pytest.approx(CMU_MPP)
    assert abs(meta["n_tiles"] - original["n_tiles"]) <= 0.02 * original["n_tiles"]


# --- diagnoses ----------------------------------------------------------------------------------------------------


def refused(path: Path) -> str:
    with pytest.raises(SlideError) as err:
        wsi.open_wsi(path, "bad")
    return str(err.value)


def test_text_file_named_svs_is_not_an_image(tmp_path):
    path = tmp_path / "slide.svs"
    path.write_text("hello, this is not a slide\n")
    assert refused(path) == (
        f"slide 'bad': '{path}' is not an image at all: it is a text file, beginning 'hello, this is not a slide' "
        "Fix: point the sheet's path at the slide image itself (check the file: it may have been renamed or "
        "overwritten)"
    )


def test_git_lfs_pointer_html_page_and_empty_file_say_what_they_are(tmp_path):
    lfs = tmp_path / "lfs.svs"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1938955\n")
    assert "is not an image at all: it is a Git LFS pointer" in refused(lfs) and "git lfs pull" in refused(lfs)
    html = tmp_path / "page.svs"
    html.write_text("<!DOCTYPE html><html><body>Access denied</body></html>")
    assert "is not an image at all: it is an HTML page" in refused(html)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    assert refused(empty) == (
        f"slide 'bad': '{empty}' is not an image at all: it is empty (0 bytes) Fix: copy the slide again from its "
        "source and check its size"
    )


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("name", "found"),
    [
        (("tiff", "pathml-smalltif.tif"), "found 1 channel of uint16 (generic series of shape (480, 640))"),
        (("qptiff", "pathml-small_vectra.qptiff"), "found 3 channels of uint8 (qpi series of shape (3, 1440, 1920))"),
    ],
)
def test_fluorescence_files_are_said_to_be_not_brightfield(shared_data, name, found):
    path = shared_data.joinpath(*name)
    assert refused(path) == (
        f"slide 'bad': '{path}' is not a brightfield slide: this workflow reads brightfield RGB slides; {found} "
        "Fix: remove it from the cohort sheet (fluorescence and multiplex images need models made for them); if it "
        "should be an H&E or IHC scan, export the brightfield scan instead (8-bit RGB)"
    )
    assert "convert" not in refused(path)


def test_plain_image_gets_a_convert_command_that_works(tmp_path, capsys):
    path = plain_png(tmp_path / "photo.png")
    message = refused(path)
    assert message.startswith(f"slide 'bad': '{path}' is a PNG image, not a whole-slide format")
    assert f"histoclip convert {path} {tmp_path / 'photo.tiff'} --mpp MPP" in message
    assert cli.main(["convert", str(path), str(tmp_path / "photo.tiff"), "--mpp", "0.5"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'photo.tiff'}: 1 levels (512×512), 0.5 µm/px")
    tiling = tile_slide(tmp_path / "photo.tiff", "photo")
    assert tiling.reader == "openslide" and tiling.vendor == "generic-tiff" and tiling.mpp == pytest.approx(0.5)


@pytest.mark.shared_data
def test_damaged_files_are_said_to_be_damaged(shared_data, cmu_rgb, tmp_path):
    path = shared_data / "broken" / "openslide-python-unopenable.tiff"
    assert refused(path) == (
        f"slide 'bad': '{path}' is a TIFF file that no reader can open: it is damaged, or uses an encoding none of "
        "them decodes (OpenSlide: Unsupported TIFF compression: 52479; tifffile: TIFF compression 52479 cannot be "
        "decoded) Fix: the file is damaged or unusually encoded; re-export or re-scan it, or remove it from the sheet"
    )
    dicom = wsi_dicom(tmp_path / "cut" / "cut.dcm", cmu_rgb[:1000, :1000], shared_data.joinpath(*BOXES_DICOM))
    data = dicom.read_bytes()
    dicom.write_bytes(data[: len(data) // 2])  # an interrupted copy
    message = refused(dicom)
    assert message.startswith(f"slide 'bad': '{dicom}' is truncated: its DICOM data set ends early (End of file")
    assert message.endswith(
        f"the file has {len(data) // 2:,} bytes Fix: the copy is incomplete (an interrupted download or transfer): "
        "copy the slide again from its source and compare its size or checksum with the original"
    )
    garbage = tmp_path / "garbage.dcm"  # a DICOM preamble and signature, then noise: damaged, not truncated
    garbage.write_bytes(b"\0" * 128 + b"DICM" + np.random.default_rng(0).bytes(4000))
    message = refused(garbage)
    assert message.startswith(f"slide 'bad': '{garbage}' is a DICOM file that no reader can open: it is damaged")
    assert message.endswith(
        "Fix: the file is damaged or unusually encoded; re-export or re-scan it, or remove it from the sheet"
    )


# --- convert --------------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_convert_stripped_tiff_to_a_pyramid_openslide_reads_keeping_mpp(shared_data, cmu_rgb, tmp_path):
    src = tmp_path / "strips.tif"
    px_per_cm = 1e4 / CMU_MPP
    tifffile.imwrite(
        src,
        cmu_rgb,
        photometric="rgb",
        rowsperstrip=16,
        compression="zlib",
        resolution=(px_per_cm, px_per_cm),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    result = convert_to_pyramid_tiff(src, tmp_path / "out.tiff")
    assert result.reader == "tifffile" and result.mpp_source == "tiff-resolution"
    assert result.levels == ((2220, 2967), (555, 742))
    with openslide.OpenSlide(str(tmp_path / "out.tiff")) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(CMU_MPP, rel=1e-4)
        assert slide.level_dimensions == ((2220, 2967), (555, 742))
        level0 = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3]
        level1 = np.asarray(slide.read_region((0, 0), 1, (555, 742)))[..., :3]
    assert mean_abs_diff(level0, cmu_rgb) < 6  # JPEG quality 90 (see the DICOM test)
    expected1 = base.area_average(np.pad(cmu_rgb, ((0, 1), (0, 0), (0, 0)), mode="edge"), 4)
    assert mean_abs_diff(level1, expected1) < 6


@pytest.mark.shared_data
def test_convert_refuses_fluorescence_with_the_diagnosis(shared_data, tmp_path, capsys):
    path = shared_data / "qptiff" / "pathml-small_vectra.qptiff"
    assert cli.main(["convert", str(path), str(tmp_path / "out.tiff")]) == 1
    assert "this workflow reads brightfield RGB slides; found 3 channels of uint8" in capsys.readouterr().err
    assert not (tmp_path / "out.tiff").exists()


# --- the reader in the preflight ------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_preflight_names_the_reader(shared_data, cmu_rgb, tmp_path):
    settings = SlideSettings.from_config(default_config())
    dicom = wsi_dicom(tmp_path / "p" / "he.dcm", cmu_rgb, shared_data.joinpath(*BOXES_DICOM))
    checks = [
        check_slide(SlideRecord("svs", "P1", shared_data.joinpath(*CMU), None), settings),
        check_slide(SlideRecord("dcm", "P2", dicom, CMU_MPP), settings),
    ]
    assert [(c.status, c.reader, c.vendor, c.mpp_source) for c in checks] == [
        ("ok", "openslide", "aperio", "openslide-metadata"),
        ("ok", "pydicom-frames", "dicom", "sheet"),
    ]
