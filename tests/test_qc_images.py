"""QC images: µ and ² are drawn as themselves (not the missing-glyph box), and a failed slide's image keeps what of
the slide can still be read, beside the error."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from bad_slides import blank_slide, good_slide, textured_rgb
from fontTools.ttLib import TTFont
from PIL import Image, ImageFont

from histoclip.config import default_config
from histoclip.demo import write_pyramid_tiff
from histoclip.errors import SlideError
from histoclip.figures import cohort_qc_figure
from histoclip.plots import FigureStyle
from histoclip.tiling import qc
from histoclip.tiling.grid import failed_slide_thumbnail, run_tiling

SYMBOLS = "µ²×"  # as in "µm/px", "mm²", "16×16 px"


def glyph(font: ImageFont.ImageFont, text: str) -> np.ndarray:
    mask = font.getmask(text)
    return np.asarray(mask, dtype=np.uint8).reshape(mask.size[1], mask.size[0])


def is_missing_glyph(font: ImageFont.ImageFont, char: str) -> bool:
    """Whether ``char`` is drawn as the font's .notdef box (what U+FFFF, a non-character, is drawn as)."""
    return np.array_equal(glyph(font, char), glyph(font, "\uffff"))


def test_the_qc_font_has_micro_and_superscript_two():
    path = qc.dejavu_sans_path()
    assert path.name == "DejaVuSans.ttf" and path.is_file()
    cmap = TTFont(path).getBestCmap()
    assert all(ord(char) in cmap for char in SYMBOLS)
    font = qc.qc_font()
    assert not any(is_missing_glyph(font, char) for char in SYMBOLS)
    # the check can fail: Pillow's default font draws them as the box (what the QC images showed before)
    assert all(is_missing_glyph(ImageFont.load_default(14), char) for char in "µ²")


def test_the_error_image_draws_micro_not_the_box():
    """The drawn image itself: "µ" and the missing-glyph box give different pixels, while two characters the
    font lacks give the same."""
    micro = np.asarray(qc.error_thumbnail("s", "0.5 µm/px, 1.2 mm²"))
    box = np.asarray(qc.error_thumbnail("s", "0.5 \uffffm/px, 1.2 mm\uffff"))
    other_box = np.asarray(qc.error_thumbnail("s", "0.5 \U0010fffdm/px, 1.2 mm\U0010fffd"))
    assert micro.shape == box.shape and not np.array_equal(micro, box)
    assert np.array_equal(box, other_box)


def test_the_cohort_qc_figure_has_every_glyph(tmp_path):
    cohort = pd.DataFrame(
        {
            "slide_id": ["a", "b"],
            "patient_id": ["P1", "P2"],
            "status": ["ok", "error"],
            "n_tiles": [10, 0],
            "tissue_area_mm2": [1.5, np.nan],
            "level0_mpp": [0.5, np.nan],
            "mpp_source": ["sheet", ""],
        }
    )
    style = FigureStyle.from_config(default_config())
    figure, _ = cohort_qc_figure(cohort, style)
    with warnings.catch_warnings(record=True) as caught, style.context():
        warnings.simplefilter("always")
        figure.savefig(tmp_path / "f.png")
    assert not [w for w in caught if "missing from font" in str(w.message)], [str(w.message) for w in caught]


def damaged_level_slide(path: Path, level: int) -> Path:
    """A pyramid whose ``level`` has every JPEG tile overwritten with noise: the other levels read."""
    write_pyramid_tiff(path, textured_rgb(2048), mpp=0.5)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=True)):
            data[offset + 2 : offset + count] = (
                np.random.default_rng(index).integers(0, 256, count - 2, np.uint8).tobytes()
            )
    path.write_bytes(bytes(data))
    return path


def test_a_failed_slide_keeps_a_readable_level_as_its_thumbnail(tmp_path):
    path = damaged_level_slide(tmp_path / "damaged.tiff", level=2)  # level 2 is where tissue detection reads
    with pytest.raises(SlideError, match="cannot be decoded at level 2"):
        run_tiling(path, "damaged", tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="fail")
    meta = run_tiling(path, "damaged", tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="record")
    assert meta["status"] == "error"
    # levels 2048², 512², 128² px: the coarsest at least thumbnail_px on a side, skipping the damaged one
    assert failed_slide_thumbnail(path, "damaged", 1024).shape == (2048, 2048, 3)
    assert failed_slide_thumbnail(path, "damaged", 512).shape == (512, 512, 3)
    assert failed_slide_thumbnail(path, "damaged", 100).shape == (512, 512, 3)  # level 2 is damaged
    thumbnail = failed_slide_thumbnail(path, "damaged", 512)
    image = np.asarray(Image.open(tmp_path / "q.png").convert("RGB"))
    assert image.shape[1] > 512  # the thumbnail and the text beside it
    shown = image[:512, :512].astype(float)
    expected = np.asarray(Image.fromarray(thumbnail)).astype(float)
    assert np.abs(shown - expected).mean() < 3  # the slide, as read
    assert (image[:, 512:] == qc.ERROR_TEXT_RGB).all(axis=2).any()  # and the error beside it


@pytest.mark.shared_data
def test_blank_and_too_small_slides_keep_their_thumbnail(tmp_path, shared_data):
    for slide_id, path in {
        "blank": blank_slide(tmp_path / "blank.tiff"),
        "small": shared_data / "synthetic" / "openslide-python-small.svs",
        "nompp": good_slide(tmp_path / "nompp.tiff", mpp=None),
    }.items():
        meta = run_tiling(path, slide_id, tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="record")
        assert meta["status"] == "error"
        image = np.asarray(Image.open(tmp_path / "q.png").convert("RGB"))
        assert image.shape[0] >= 512 and image.shape[1] > 512, (slide_id, image.shape)
        assert not (image[:512, :512] == qc.ERROR_BACKGROUND_RGB).all(axis=2).any(), slide_id


@pytest.mark.shared_data
def test_a_slide_nothing_can_be_read_from_gets_the_text_alone(shared_data, tmp_path):
    # unreadable.svs: its only level and its associated thumbnail both fail to decode ("Bogus marker length")
    path = shared_data / "broken" / "openslide-python-unreadable.svs"
    assert failed_slide_thumbnail(path, "bad", 1024) is None
    run_tiling(path, "bad", tmp_path / "t.parquet", tmp_path / "q.png", on_slide_error="record")
    image = np.asarray(Image.open(tmp_path / "q.png").convert("RGB"))
    assert (image == qc.ERROR_BACKGROUND_RGB).all(axis=2).mean() > 0.9
    assert failed_slide_thumbnail(tmp_path / "missing.svs", "missing", 1024) is None
