"""Audits of a cohort's results against what should not drive them; today the hospital a slide came from.

:mod:`~histoclip.audit.sites` reads each slide's site (a sheet column, or the tissue-source-site code of TCGA
barcodes); :mod:`~histoclip.audit.site` measures how much the slide embeddings, clusters, phenotypes, calls and
Cox models depend on it.
"""
