"""histoclip: a Snakemake workflow for whole-slide image cohorts with CLIP vision-language models."""

__version__ = "0.1.0"
