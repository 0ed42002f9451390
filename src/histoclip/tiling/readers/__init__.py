"""Slide readers: the one place a slide file is opened (:func:`open_reader`), and what is said when none can.

Readers are tried in order, the first that opens the file wins (its ``name`` goes into the tile file, the cohort
table and the preflight table):

1. ``openslide`` — every format OpenSlide reads (its reads are unchanged, so their outputs are too);
2. ``wsidicom`` — DICOM WSI pyramids OpenSlide rejects (e.g. JPEG-LS frames);
3. ``pydicom-frames`` — a single DICOM WSI instance without ImageType (rejected by both of the above);
4. ``tifffile`` — stripped (untiled) RGB TIFFs, OME-TIFF;
5. ``pylibczirw`` — Zeiss CZI (optional extra ``histoclip[czi]``).

Only the readers that fit what the file is (its first bytes: :func:`sniff`) are tried after OpenSlide. When none
opens it, :func:`diagnose` says what the file really is: not an image at all (text, an HTML page, a Git LFS
pointer, empty), a plain image (convert it: ``histoclip convert``), a slide format that is damaged, or a format
no reader here opens. A file that is an image but not a brightfield RGB one (fluorescence, multiplex) is said to
be so, with no advice to convert it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histoclip.tiling.readers.base import (
    NotBrightfield,
    ReaderRefused,
    ReadError,
    RegionReader,
    SlideReader,
    Truncated,
)

__all__ = [
    "FileKind",
    "NotBrightfield",
    "READER_NAMES",
    "ReadError",
    "ReaderRefused",
    "RegionReader",
    "SlideReader",
    "Truncated",
    "sniff",
]

#: Every reader, in the order they are tried.
READER_NAMES = ("openslide", "wsidicom", "pydicom-frames", "tifffile", "pylibczirw")

#: Plain image formats: Pillow reads them, so ``histoclip convert`` can turn them into a pyramidal TIFF.
PLAIN_IMAGES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
}
#: Signatures of other files a sheet may point at by mistake.
OTHER_FILES = {
    b"PK\x03\x04": "ZIP archive",
    b"\x1f\x8b": "gzip archive",
    b"%PDF": "PDF document",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n": "JPEG 2000 image",
}


@dataclass(frozen=True)
class FileKind:
    """What a file is by its first bytes: ``family`` is one of tiff, dicom, czi, image, text, empty, other."""

    family: str
    label: str
    head: bytes = b""


def sniff(path: str | Path) -> FileKind:
    """The file's family from its signature (reads at most 512 bytes)."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        return FileKind("empty", "an empty file (0 bytes)")
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return FileKind("tiff", "TIFF", head)
    if head[128:132] == b"DICM":
        return FileKind("dicom", "DICOM", head)
    if head.startswith(b"ZISRAWFILE"):
        return FileKind("czi", "Zeiss CZI", head)
    for magic, label in PLAIN_IMAGES.items():
        if head.startswith(magic):
            return FileKind("image", f"{label} image", head)
    for magic, label in OTHER_FILES.items():
        if head.startswith(magic):
            return FileKind("other", label, head)
    if _is_text(head):
        return FileKind("text", "text", head)
    return FileKind("other", "file of unknown format", head)


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # a multi-byte character cut at the 512-byte boundary is still text
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(ch.isprintable() or ch in "\r\n\t\f" for ch in text)


def candidates(kind: FileKind) -> list[type]:
    """The readers after OpenSlide that fit a file of this kind, in order."""
    if kind.family == "dicom":
        from histoclip.tiling.readers.dicom import DicomFramesReader, WsiDicomReader

        return [WsiDicomReader, DicomFramesReader]
    if kind.family == "tiff":
        from histoclip.tiling.readers.tiff import TiffReader

        return [TiffReader]
    if kind.family == "czi":
        from histoclip.tiling.readers.czi import CziReader

        return [CziReader]
    return []


def text_kind(head: bytes) -> tuple[str, str]:
    """(what the text is, how to fix it) for a text file where a slide was expected."""
    text = head.decode("utf-8", errors="replace").lstrip()
    lower = text[:200].lower()
    if text.startswith("version https://git-lfs"):
        return (
            "a Git LFS pointer (the slide itself was never downloaded)",
            "fetch the real file (git lfs pull, or download it again) and check its size",
        )
    if lower.startswith(("<!doctype html", "<html")) or "<html" in lower:
        return (
            "an HTML page (often the error or login page a failed download saved under the slide's name)",
            "download the slide again and check its size and checksum",
        )
    if text.startswith("[GENERAL]"):
        return (
            "a MIRAX index whose slide data OpenSlide could not open",
            "keep the .mrxs file beside its data folder of the same name, as the scanner wrote them",
        )
    return (
        "a text file",
        "point the sheet's path at the slide image itself (check the file: it may have been renamed or overwritten)",
    )
