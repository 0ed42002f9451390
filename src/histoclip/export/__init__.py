"""Exports of a run's results in the formats other tools read.

* :mod:`~histoclip.export.qupath`: one GeoJSON FeatureCollection per slide that QuPath's *Import objects* reads
  (``results/qupath/{model}/{slide}.geojson``): the tissue regions as annotations and every tile as a detection
  with its zero-shot scores and phenotype as measurements.
* :mod:`~histoclip.export.h5ad`: AnnData for scanpy and squidpy: the cohort's slides
  (``results/export/{model}/slides.h5ad``) and, on request, each slide's tiles
  (``results/export/{model}/tiles/{slide}.h5ad``).
* :mod:`~histoclip.export.mil_h5`: one HDF5 file per slide in the layout CLAM and TRIDENT read
  (``results/export/{model}/h5/{slide}.h5``: ``features``, ``coords`` and their attributes), to train a MIL model
  on histoclip's features.

Every export reads the stage outputs through :mod:`histoclip.formats` (:mod:`~histoclip.export.tiles` aligns one
slide's tile-level files row by row), writes atomically and carries the model's provenance.
"""
