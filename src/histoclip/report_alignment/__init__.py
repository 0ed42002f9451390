"""Slide–report alignment on the frozen tile embeddings (weak supervision from pathology reports).

The tile encoder and the text tower stay frozen; what is learnt is small: an attention pooler over a slide's
tile embeddings and two residual projections of the CLIP space, trained contrastively so that a slide lands
next to its own report (:mod:`~histoclip.report_alignment.model`, :mod:`~histoclip.report_alignment.training`).
It runs on a CPU in minutes because the tile embeddings are already stored.

Modules: ``reports`` (the reports table, chunking, text-tower embedding), ``bags`` (tiles drawn per training
step; the bags themselves are :mod:`histoclip.bags`, shared with MIL), ``model``, ``training``, ``retrieval``
(report ↔ slide recall@k and median rank on held-out slides), ``calls`` (report-style slide zero-shot through
the aligned space), ``attention`` (attention maps in the evidence style).
"""
