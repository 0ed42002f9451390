"""Rule slides_anndata: sheet, slide embeddings, calls, clusters, compositions → results/export/{model}/slides.h5ad."""

from pathlib import Path

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.export.h5ad import slides_anndata, write_h5ad
from histoclip.export.tiles import ModelResults
from histoclip.logs import rule_log

with rule_log(snakemake.log[0], "histoclip.export.h5ad") as log:
    results = ModelResults.of(
        snakemake.wildcards.model,
        calls=dict(zip(snakemake.params.prompt_sets, snakemake.input.calls, strict=True)),
        phenotype_dir=Path(snakemake.input.phenotypes).parent,
    )
    adata = slides_anndata(
        snakemake.params.sheet,
        snakemake.input.slides,
        results,
        clusters=snakemake.input.clusters,
        clustering_summary=snakemake.input.clustering,
    )
    write_h5ad(adata, snakemake.output.h5ad)
    log.info("%d slides × %d dimensions, %d obs columns", adata.n_obs, adata.n_vars, adata.obs.shape[1])
