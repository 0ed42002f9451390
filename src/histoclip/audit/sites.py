"""The site (hospital, tissue source) of every slide: a sheet column, or the TSS code of a TCGA barcode.

A TCGA barcode reads ``TCGA-TSS-PPPP-…`` (e.g. ``TCGA-05-4244-01Z-00-DX1``): the two characters after ``TCGA-``
name the tissue source site, the hospital that sent the sample. Slides are grouped by it in the site audit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

from histoclip.errors import InputError

__all__ = ["TCGA_BARCODE", "site_column", "tcga_site"]

#: A TCGA barcode: project, tissue source site (group 1), participant.
TCGA_BARCODE = re.compile(r"^TCGA-([A-Z0-9]{2})-[A-Z0-9]{4}", re.IGNORECASE)


def tcga_site(slide_id: str, patient_id: str = "") -> str | None:
    """The TSS code of the slide id's barcode, or of the patient id's; None when neither is a TCGA barcode."""
    for text in (slide_id, patient_id):
        match = TCGA_BARCODE.match(str(text))
        if match:
            return match.group(1).upper()
    return None


def site_column(sheet: pd.DataFrame, *, site_from: str, column: str, where: str) -> pd.Series:
    """Each slide's site (index slide_id; "" where unknown): from ``column`` of the sheet, or (``tcga_barcode``)
    from the TSS code of the slide or patient id. A missing column, or ids that are not barcodes, are errors
    naming the sheet and the first such slide."""
    ids = sheet["slide_id"].astype(str)
    if site_from == "tcga_barcode":
        sites = [tcga_site(s, p) for s, p in zip(ids, sheet["patient_id"].astype(str), strict=True)]
        missing = [s for s, site in zip(ids, sites, strict=True) if site is None]
        if missing:
            raise InputError(
                f"{len(missing)} slide(s) have neither a slide id nor a patient id that is a TCGA barcode "
                f"(TCGA-TSS-PPPP…), e.g. {missing[0]!r}",
                where=where,
                fix="use TCGA barcodes as ids, or give a site column and set audit.site_from: column",
            )
        return pd.Series(sites, index=ids.to_numpy(), name="site")
    if column not in sheet.columns:
        raise InputError(
            f"has no column {column!r} (columns: {list(sheet.columns)})",
            where=where,
            fix=f"add a {column!r} column (the hospital of each slide), set audit.site_column, or "
            "audit.site_from: tcga_barcode",
        )
    return pd.Series(sheet[column].fillna("").astype(str).str.strip().to_numpy(), index=ids.to_numpy(), name="site")


def patient_sites(sites: pd.Series, patients: Sequence[str]) -> pd.Series:
    """Each patient's site: the most frequent among its slides (ties: the first in sorted order)."""
    frame = pd.DataFrame({"patient": list(patients), "site": sites.to_numpy()})
    frame = frame[frame["site"] != ""]
    return frame.groupby("patient")["site"].agg(lambda s: sorted(s.value_counts()[lambda v: v == v.max()].index)[0])
