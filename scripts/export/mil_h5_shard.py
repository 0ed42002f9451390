"""Rules mil_h5_{model}_{shard}: each slide of an embedding shard → results/export/{model}/h5/{slide}.h5 (CLAM and
TRIDENT layout), and the shard's index → results/export/{model}/h5/index/{shard}.tsv."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.export.mil_h5 import export_h5_shard
from histoclip.formats import embedding_paths
from histoclip.logs import rule_log

with rule_log(snakemake.log[0], "histoclip.export.mil_h5") as log:
    params = snakemake.params
    rows = export_h5_shard(
        params.slides,
        params.tiles,
        embedding_paths(snakemake.input.embeddings, params.slides),
        snakemake.output.h5,
        snakemake.output.index,
        params.model,
    )
    log.info("%d slides, %d tiles", len(rows), sum(row["n_tiles"] for row in rows))
