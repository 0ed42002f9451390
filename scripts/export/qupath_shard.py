"""Rules qupath_{model}_{shard}: each slide of an embedding shard → results/qupath/{model}/{slide}.geojson, and the
shard's index → results/qupath/{model}/index/{shard}.tsv."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.export.qupath import export_qupath_shard
from histoclip.export.tiles import ModelResults
from histoclip.formats import embedding_paths
from histoclip.logs import rule_log

with rule_log(snakemake.log[0], "histoclip.export.qupath") as log:
    params = snakemake.params
    results = ModelResults.of_job(params, snakemake.input)
    rows = export_qupath_shard(
        params.slides,
        params.tiles,
        params.masks,
        embedding_paths(snakemake.input.embeddings, params.slides),
        results,
        snakemake.output.geojson,
        snakemake.output.index,
    )
    log.info(
        "%d slides, %d tile detections; classified by %s",
        len(rows),
        sum(row["n_tiles"] for row in rows),
        f"prompt set {results.first_prompt_set}" if results.first_prompt_set else "nothing (no text tower)",
    )
