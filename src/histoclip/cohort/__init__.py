"""Cohort-level analyses of tile embeddings: slide aggregation, tile phenotypes, slide clustering."""
