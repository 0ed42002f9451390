"""Rule phenotype_gallery: the most central tiles of each phenotype, read from the slides, one row per phenotype."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)
import pandas as pd

from histoclip.cohort.gallery import gallery_figure, read_gallery_pixels
from histoclip.logs import rule_log
from histoclip.plots import FigureStyle, save_figure
from histoclip.sheets import read_cohort_sheet

with rule_log(snakemake.log[0], "histoclip.figures") as log:
    style = FigureStyle.from_config(snakemake.params.style)
    records = read_cohort_sheet(snakemake.params.sheet)
    gallery = pd.read_csv(snakemake.input.gallery_tiles, sep="\t", dtype={"slide_id": str})
    phenotypes = pd.read_csv(snakemake.input.phenotypes, sep="\t")
    tile_files = {r.slide_id: snakemake.params.tiles.format(slide=r.slide_id) for r in records}
    images = read_gallery_pixels(gallery, {r.slide_id: r.path for r in records}, tile_files)
    figure = gallery_figure(gallery, phenotypes, images, style)
    stem = snakemake.output.tsv.removesuffix(".tsv")
    title = f"Phenotype gallery: {snakemake.wildcards.model}"
    written = save_figure(figure, stem, style, data=gallery, title=title, report_copy=True)
    log.info("wrote %s", ", ".join(map(str, written)))
