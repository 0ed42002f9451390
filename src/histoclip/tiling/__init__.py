"""Slide tiling: reading slides (OpenSlide), microns per pixel, tissue detection, tile grids, QC thumbnails."""
