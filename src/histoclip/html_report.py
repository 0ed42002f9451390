"""What a ``snakemake --report`` HTML file carries: every embedded result file with its type and size.

Why: the report is one self-contained HTML file, each figure and table inside it as a base64 data URI, so its
size is the sum of what it embeds. Which files those are decides whether a 2,000-slide cohort's report still
opens in a browser; the report-size benchmark and the demo's test read them back from the file itself rather
than trusting the rules' ``report()`` declarations.
"""

from __future__ import annotations

import base64
import io
import os
import re

import pandas as pd

__all__ = ["embedded_files"]

#: A data URI as Snakemake's report template writes it: mime type, charset, file name, then the base64 payload.
_DATA_URI = re.compile(r'"data:([\w/+.-]+);charset=[\w-]+;filename=([^;"]+);base64,([A-Za-z0-9+/=]*)"')


def embedded_files(report: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per file embedded in ``report``: ``filename``, ``mime_type``, ``encoded_bytes`` (what it adds to
    the HTML), ``bytes`` (the file's own size) and, for images, ``width_px`` and ``height_px``."""
    from PIL import Image

    with open(report, encoding="utf-8") as handle:
        html = handle.read()
    rows = []
    for mime, name, payload in _DATA_URI.findall(html):
        raw = base64.b64decode(payload)
        width = height = None
        if mime in ("image/png", "image/jpeg"):
            with Image.open(io.BytesIO(raw)) as image:
                width, height = image.size
        rows.append(
            {
                "filename": name,
                "mime_type": mime,
                "encoded_bytes": len(payload),
                "bytes": len(raw),
                "width_px": width,
                "height_px": height,
            }
        )
    columns = ["filename", "mime_type", "encoded_bytes", "bytes", "width_px", "height_px"]
    return pd.DataFrame(rows, columns=columns)
