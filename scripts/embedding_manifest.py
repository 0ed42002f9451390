"""Rule embedding_manifest: a model's embedding files → results/embeddings/{model}.tsv (slide_id, path)."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.aggregation import write_embedding_manifest
from histoclip.logs import rule_log

with rule_log(snakemake.log[0], "histoclip.embedding_manifest") as log:
    write_embedding_manifest(snakemake.output.manifest, snakemake.params.slides, snakemake.input.embeddings)
    log.info("%d embedding files listed in %s", len(snakemake.params.slides), snakemake.output.manifest)
