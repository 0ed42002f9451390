"""DICOM whole-slide images OpenSlide rejects.

Two readers, tried in this order:

- :class:`WsiDicomReader` (``wsidicom``): standard VL Whole Slide Microscopy pyramids in transfer syntaxes
  OpenSlide does not decode (JPEG-LS, JPEG XL, HTJ2K, RLE...). It groups the instances of the file's folder
  that belong to the same series into a pyramid, as OpenSlide does.
- :class:`DicomFramesReader` (``pydicom`` + ``imagecodecs``): one VL Whole Slide Microscopy instance whose frames
  tile the total pixel matrix row by row (TILED_FULL), read even when it lacks the ImageType attribute. Both
  OpenSlide ("Couldn't get image flavor") and wsidicom ("Level files not found") sort instances by ImageType
  and reject such a file, yet it is a valid, readable image. Frames are located once (the item offsets of the
  encapsulated pixel data, read without the frames themselves) and decoded one at a time on demand.

PixelSpacing is in mm (row, column): µm per pixel = 1000 × spacing. A file without it has no mpp of its own and
the cohort sheet must give one.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from histoclip.tiling.readers.base import (
    Level,
    NotBrightfield,
    ReaderRefused,
    ReadError,
    RegionReader,
    Truncated,
    add_virtual_levels,
)

VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"

#: Transfer syntaxes :class:`DicomFramesReader` decodes, by the imagecodecs function that decodes a frame.
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_DECODERS = {
    "1.2.840.10008.1.2.4.50": "jpeg8_decode",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "jpeg8_decode",  # JPEG extended
    "1.2.840.10008.1.2.4.57": "jpeg8_decode",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "jpeg8_decode",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "jpegls_decode",
    "1.2.840.10008.1.2.4.81": "jpegls_decode",
    "1.2.840.10008.1.2.4.90": "jpeg2k_decode",
    "1.2.840.10008.1.2.4.91": "jpeg2k_decode",
}


def _pixel_spacing_mpp(ds) -> tuple[float, float] | None:
    """(x, y) µm/px from the shared functional groups' PixelSpacing (row spacing, column spacing in mm)."""
    try:
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        row_mm, column_mm = float(spacing[0]), float(spacing[1])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    if row_mm <= 0 or column_mm <= 0:
        return None
    return column_mm * 1000.0, row_mm * 1000.0


def _check_brightfield(ds) -> None:
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    bits = int(getattr(ds, "BitsAllocated", 8))
    if samples != 3 or bits != 8:
        raise NotBrightfield(samples, f"uint{bits}", f"DICOM {getattr(ds, 'PhotometricInterpretation', '')}".strip())


class WsiDicomReader(RegionReader):
    name = "wsidicom"
    vendor = "dicom"
    mpp_source = "dicom-metadata"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import pydicom
        from wsidicom import WsiDicom

        path = Path(path)
        try:
            head = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPClassUID"])
        except Exception as exc:
            raise ReaderRefused(f"wsidicom: not a DICOM file ({exc})") from exc
        if str(getattr(head, "SOPClassUID", "")) != VL_WSI:
            raise ReaderRefused(
                f"wsidicom: not a VL Whole Slide Microscopy image ({getattr(head, 'SOPClassUID', '?')})"
            )
        files = self._series_files(path, str(getattr(head, "SeriesInstanceUID", "")))
        try:
            self._wsi = WsiDicom.open(files)
        except Exception as exc:  # wsidicom's "Level files not found", unsupported syntax, ...
            raise ReaderRefused(f"wsidicom: {exc}") from exc
        try:
            levels = list(self._wsi.levels)
            base = levels[0]
            self._mpp: tuple[float, float] | None
            try:
                self._mpp = float(base.mpp.width), float(base.mpp.height)
            except Exception:  # no PixelSpacing
                self._mpp = None
            stored = [
                Level(lv.size.width, lv.size.height, base.size.width / lv.size.width, i, 1)
                for i, lv in enumerate(levels)
            ]
            self._pyramid_levels = [lv.level for lv in levels]
            self._tile_sizes = [(lv.tile_size.width, lv.tile_size.height) for lv in levels]
            self._levels = add_virtual_levels(stored)
            self._properties = {"dicom.instances": str(len(files)), "dicom.levels": str(len(levels))}
        except Exception:
            self._wsi.close()
            raise

    @staticmethod
    def _series_files(path: Path, series_uid: str) -> list[Path]:
        """The file and the other DICOM files beside it of the same series (a pyramid is one file per level)."""
        import pydicom

        if not series_uid:
            return [path]
        files = [path]
        for other in sorted(path.parent.iterdir()):
            if other == path or not other.is_file() or other.suffix.lower() not in (".dcm", ""):
                continue
            try:
                ds = pydicom.dcmread(other, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            except Exception:
                continue
            if str(getattr(ds, "SeriesInstanceUID", "")) == series_uid:
                files.append(other)
        return files

    def metadata_mpp(self) -> tuple[float, float] | None:
        return self._mpp

    def tile_size(self, level: int) -> tuple[int, int] | None:
        spec = self._levels[level]
        return self._tile_sizes[spec.source] if spec.factor == 1 else None

    def close(self) -> None:
        self._wsi.close()

    def _read_stored(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        try:
            region = self._wsi.read_region((x, y), self._pyramid_levels[level], (width, height), as_array=True)
        except Exception as exc:
            raise ReadError(f"DICOM frames at level {level}, x={x}, y={y} cannot be decoded: {exc}") from exc
        return np.ascontiguousarray(np.asarray(region)[..., :3], dtype=np.uint8)


class DicomFramesReader(RegionReader):
    name = "pydicom-frames"
    vendor = "dicom"
    mpp_source = "dicom-metadata"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import pydicom

        self._path = Path(path)
        self._size = self._path.stat().st_size
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = pydicom.dcmread(self._path, defer_size=256)
            except Exception as exc:
                raise ReaderRefused(f"pydicom: not a DICOM file ({exc})") from exc
        ended = [str(w.message) for w in caught if "End of file" in str(w.message)]
        if ended or (len(ds) == 0 and str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == VL_WSI):
            raise Truncated(
                f"its DICOM data set ends early ({ended[0] if ended else 'no element could be read'}); the file "
                f"has {self._size:,} bytes"
            )
        if str(getattr(ds, "SOPClassUID", "")) != VL_WSI:
            raise ReaderRefused(f"pydicom: not a VL Whole Slide Microscopy image ({getattr(ds, 'SOPClassUID', '?')})")
        _check_brightfield(ds)
        organisation = str(getattr(ds, "DimensionOrganizationType", "TILED_FULL"))
        if organisation != "TILED_FULL":
            raise ReaderRefused(f"pydicom: frames organised as {organisation}, not TILED_FULL, are not placed")
        self._syntax = str(ds.file_meta.TransferSyntaxUID)
        if self._syntax not in _NATIVE and self._syntax not in _DECODERS:
            raise ReaderRefused(f"pydicom: transfer syntax {self._syntax} is not decoded")
        self._frame_w, self._frame_h = int(ds.Columns), int(ds.Rows)
        width = int(getattr(ds, "TotalPixelMatrixColumns", ds.Columns))
        height = int(getattr(ds, "TotalPixelMatrixRows", ds.Rows))
        self._across = math.ceil(width / self._frame_w)
        self._frames = int(getattr(ds, "NumberOfFrames", 1))
        if self._frames < self._across * math.ceil(height / self._frame_h):
            raise ReaderRefused(
                f"pydicom: {self._frames} frames of {self._frame_w}×{self._frame_h} cannot tile a {width}×{height} "
                "matrix"
            )
        self._planar = int(getattr(ds, "PlanarConfiguration", 0))
        self._ybr = str(getattr(ds, "PhotometricInterpretation", "RGB")).startswith("YBR_FULL") and (
            self._syntax in _NATIVE
        )
        self._mpp = _pixel_spacing_mpp(ds)
        self._offsets = self._frame_offsets(ds)
        if self._offsets and sum(self._offsets[-1]) > self._size:
            raise Truncated(
                f"DICOM frame {len(self._offsets) - 1} ends at byte {sum(self._offsets[-1]):,} but the file has "
                f"{self._size:,} bytes"
            )
        self._fh = open(self._path, "rb")  # noqa: SIM115 - held for the reader's life, closed in close()
        self._levels = add_virtual_levels([Level(width, height, 1.0, 0, 1)])
        self._properties = {
            "dicom.transfer-syntax": self._syntax,
            "dicom.frames": str(self._frames),
            "dicom.image-type": "\\".join(getattr(ds, "ImageType", [])) or "(missing)",
        }

    def _frame_offsets(self, ds) -> list[tuple[int, int]]:
        """(file offset, length) of every frame, read from the item headers only (no frame is read)."""
        from pydicom.encaps import parse_basic_offsets, parse_fragments

        element = ds._dict.get(0x7FE00010)
        tell = getattr(element, "value_tell", None)
        if tell is None:
            raise ReaderRefused("pydicom: no PixelData element")
        if self._syntax in _NATIVE:
            frame_bytes = self._frame_w * self._frame_h * 3
            return [(tell + i * frame_bytes, frame_bytes) for i in range(self._frames)]
        with open(self._path, "rb") as fh:
            fh.seek(tell)
            parse_basic_offsets(fh)  # steps over the basic offset table item
            count, starts = parse_fragments(fh)
        if count != self._frames:
            raise ReaderRefused(
                f"pydicom: {count} fragments for {self._frames} frames (fragmented frames are not read)"
            )
        # each offset points at an item tag (4 bytes) followed by the item length (4 bytes, little endian)
        offsets = []
        with open(self._path, "rb") as fh:
            for start in starts:
                fh.seek(start + 4)
                length = int.from_bytes(fh.read(4), "little")
                offsets.append((start + 8, length))
        return offsets

    def metadata_mpp(self) -> tuple[float, float] | None:
        return self._mpp

    def tile_size(self, level: int) -> tuple[int, int] | None:
        return (self._frame_w, self._frame_h) if self._levels[level].factor == 1 else None

    def close(self) -> None:
        self._fh.close()

    def _frame(self, index: int) -> np.ndarray:
        import imagecodecs

        offset, length = self._offsets[index]
        if offset + length > self._size:
            raise ReadError(
                f"DICOM frame {index} ends at byte {offset + length:,} but the file has {self._size:,} bytes"
            )
        self._fh.seek(offset)
        data = self._fh.read(length)
        try:
            if self._syntax in _NATIVE:
                shape = (3, self._frame_h, self._frame_w) if self._planar else (self._frame_h, self._frame_w, 3)
                frame = np.frombuffer(data, np.uint8).reshape(shape)
                frame = np.moveaxis(frame, 0, -1) if self._planar else frame
                if self._ybr:
                    frame = _ybr_to_rgb(frame)
            else:
                frame = getattr(imagecodecs, _DECODERS[self._syntax])(data)
        except Exception as exc:
            raise ReadError(f"DICOM frame {index} cannot be decoded: {exc}") from exc
        if frame.ndim != 3 or frame.shape[2] < 3:
            raise ReadError(f"DICOM frame {index} decoded to shape {frame.shape}, not RGB")
        return frame[..., :3]

    def _read_stored(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        out = np.full((height, width, 3), 255, np.uint8)
        fw, fh = self._frame_w, self._frame_h
        for row in range(y // fh, (y + height - 1) // fh + 1):
            for col in range(x // fw, (x + width - 1) // fw + 1):
                frame = self._frame(row * self._across + col)
                fx, fy = col * fw, row * fh
                top, left = max(y, fy), max(x, fx)
                bottom, right = min(y + height, fy + frame.shape[0]), min(x + width, fx + frame.shape[1])
                if bottom > top and right > left:
                    out[top - y : bottom - y, left - x : right - x] = frame[
                        top - fy : bottom - fy, left - fx : right - fx
                    ]
        return out


def _ybr_to_rgb(ybr: np.ndarray) -> np.ndarray:
    """YBR_FULL (uncompressed) to RGB, as DICOM PS3.3 C.7.6.3.1.2 defines it."""
    y, cb, cr = (ybr[..., i].astype(np.float32) for i in range(3))
    rgb = np.stack(
        [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], -1
    )
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
