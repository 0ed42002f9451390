"""Rules tile_anndata_{model}_{shard}: each slide of an embedding shard → results/export/{model}/tiles/{slide}.h5ad,
and the shard's index → results/export/{model}/tiles/index/{shard}.tsv."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.export.h5ad import export_tile_anndata_shard
from histoclip.export.tiles import ModelResults
from histoclip.formats import embedding_paths
from histoclip.logs import rule_log

with rule_log(snakemake.log[0], "histoclip.export.h5ad") as log:
    params = snakemake.params
    results = ModelResults.of_job(params, snakemake.input)
    rows = export_tile_anndata_shard(
        params.slides,
        params.tiles,
        embedding_paths(snakemake.input.embeddings, params.slides),
        results,
        snakemake.output.h5ad,
        snakemake.output.index,
    )
    log.info("%d slides, %d tiles", len(rows), sum(row["n_tiles"] for row in rows))
