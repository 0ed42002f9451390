"""Rule embedding_manifest: the embedding shards' manifests → results/embeddings/{model}.tsv (slide_id, path)."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.formats import embedding_paths
from histoclip.logs import rule_log
from histoclip.store import concat_tsv_atomic

with rule_log(snakemake.log[0], "histoclip.embedding_manifest") as log:
    concat_tsv_atomic(snakemake.input.shards, snakemake.output.manifest)
    embedding_paths(snakemake.output.manifest, snakemake.params.slides)  # the sheet's slides, in its order
    log.info("%d embedding files listed in %s", len(snakemake.params.slides), snakemake.output.manifest)
