"""One figure style for every figure of the workflow, and atomic figure writes with their source data.

Why: a paper's figures come out of the DAG, so they must look alike (fonts, sizes, colours), be written
atomically like every other output (a killed job never leaves half a PDF), and carry the numbers they show
as a TSV beside them so that a reviewer (or a test) can check a plot without reading pixels.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never with ``pyplot``: no
global state, no display needed on a cluster node, and nothing leaks between figures of one job.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from histoclip.store import atomic_path, package_versions, write_tsv

__all__ = ["FigureStyle", "class_colours", "figure_paths", "new_figure", "save_figure", "write_tsv"]

#: Colour-blind-safe palette (Okabe & Ito), in the order classes are listed.
PALETTE: tuple[str, ...] = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#F0E442",
    "#000000",
)


@dataclass(frozen=True)
class FigureStyle:
    """Sizes in inches and points, shared by every figure (config key ``figures``; ``rc``: extra rcParams)."""

    width_in: float
    height_in: float
    dpi: int
    font_size: float
    formats: tuple[str, ...]
    report_px: int
    rc: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FigureStyle:
        """The style keys of ``figures`` (its ``evidence`` key: histoclip.zeroshot.evidence.EvidenceOptions)."""
        figures = config["figures"]
        return cls(
            width_in=figures["width_in"],
            height_in=figures["height_in"],
            dpi=figures["dpi"],
            font_size=figures["font_size"],
            formats=tuple(figures["formats"]),
            report_px=figures["report_px"],
        )

    def context(self) -> Any:
        """Draw inside ``with style.context():`` — axes take fonts and spines from rcParams when created."""
        import matplotlib

        return matplotlib.rc_context(self.rc_params())

    def rc_params(self) -> dict[str, Any]:
        return {
            "font.size": self.font_size,
            "axes.titlesize": self.font_size + 1,
            "axes.labelsize": self.font_size,
            "xtick.labelsize": self.font_size - 1,
            "ytick.labelsize": self.font_size - 1,
            "legend.fontsize": self.font_size - 1,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "pdf.fonttype": 42,  # TrueType in PDFs: text stays editable in a journal's tools
            "svg.fonttype": "none",
            **dict(self.rc),
        }


def class_colours(classes: Sequence[str]) -> dict[str, str]:
    """A stable colour per class: the same class gets the same colour in every figure of a run."""
    return {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(classes)}


def new_figure(style: FigureStyle, *, width_in: float | None = None, height_in: float | None = None) -> Figure:
    """An empty figure with the style's sizes (no pyplot, no global state). Call it, add axes and draw inside
    ``with style.context():`` so that the style's fonts apply."""
    figure = Figure(
        figsize=(width_in or style.width_in, height_in or style.height_in), dpi=style.dpi, layout="constrained"
    )
    FigureCanvasAgg(figure)
    return figure


def _metadata(fmt: str, title: str | None) -> dict[str, Any]:
    versions = package_versions()
    creator = f"histoclip {versions['histoclip']} (matplotlib)"
    if fmt == "pdf":
        # No CreationDate: two runs of the same data give byte-identical PDFs.
        return {"Creator": creator, "Title": title or "", "CreationDate": None, "Producer": None}
    if fmt == "png":
        return {"Software": creator, **({"Title": title} if title else {})}
    return {}


#: Suffix of a figure's copy for the HTML report (see :func:`save_figure`).
REPORT_COPY = "report.jpg"
#: JPEG quality of report copies: tiles and thumbnails stay faithful to the eye at a tenth of a PNG's bytes.
REPORT_JPEG_QUALITY = 85


def save_figure(
    figure: Figure,
    path_stem: str | os.PathLike[str],
    style: FigureStyle,
    *,
    data: pd.DataFrame | None = None,
    title: str | None = None,
    report_copy: bool = False,
) -> list[Path]:
    """Write ``figure`` as ``{stem}.{fmt}`` for each of the style's formats, atomically, and its source data as
    ``{stem}.tsv`` when given. Returns the paths written.

    ``report_copy`` also writes ``{stem}.report.jpg``, no wider or taller than ``style.report_px``: what the HTML
    report embeds for figures made of tissue images (evidence, galleries). Why a copy: the report is one HTML
    file with every image inside it, and such a figure is 1-2 MB as a PNG at print resolution; a report of a few
    dozen of them no longer opens in a browser. The full-resolution files stay in results/ for looking closely.
    """
    stem = Path(path_stem)
    written: list[Path] = []
    with style.context():
        for fmt in style.formats:
            final = stem.with_name(f"{stem.name}.{fmt}")
            with atomic_path(final) as tmp:
                figure.savefig(tmp, format=fmt, dpi=style.dpi, metadata=_metadata(fmt, title))
            written.append(final)
        if report_copy:
            final = stem.with_name(f"{stem.name}.{REPORT_COPY}")
            _save_report_copy(figure, final, style)
            written.append(final)
    if data is not None:
        final = stem.with_name(f"{stem.name}.tsv")
        write_tsv(data, final)
        written.append(final)
    return written


def _save_report_copy(figure: Figure, path: Path, style: FigureStyle) -> None:
    """``figure`` as a JPEG whose longer side is at most ``style.report_px`` (never above the style's dpi)."""
    import io

    from PIL import Image

    width_in, height_in = figure.get_size_inches()
    dpi = min(style.dpi, style.report_px / max(width_in, height_in))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    image = Image.open(buffer).convert("RGB")
    if max(image.size) > style.report_px:  # rounding of the canvas: never a pixel over
        image.thumbnail((style.report_px, style.report_px), Image.Resampling.LANCZOS)
    with atomic_path(path) as tmp:
        image.save(tmp, format="JPEG", quality=REPORT_JPEG_QUALITY, optimize=True, progressive=True)


def figure_paths(stem: str, formats: Iterable[str]) -> list[str]:
    """The files :func:`save_figure` writes for ``stem`` (for rule outputs)."""
    return [f"{stem}.{fmt}" for fmt in formats]
