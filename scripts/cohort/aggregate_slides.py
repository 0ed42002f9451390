"""Rule aggregate: every slide's embedding file (+ zero-shot tile scores) → results/slides/{model}.parquet."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.cohort.aggregation import aggregate_slides
from histoclip.formats import embedding_paths
from histoclip.logs import rule_log

with rule_log(snakemake.log[0], "histoclip.cohort.aggregation") as log:
    slides = list(snakemake.params.slides)
    settings = snakemake.params.settings
    score_files = None
    if settings["prompt_set"]:
        score_files = [f"{snakemake.input.tile_scores[0]}/{slide}.parquet" for slide in slides]
    table = aggregate_slides(
        slides,
        snakemake.params.patients,
        embedding_paths(snakemake.input.embeddings, snakemake.params.slides),
        snakemake.output.slides,
        tile_score_files=score_files,
        class_top_k=settings["class_top_k"],
        extra_metadata={"class_prompt_set": settings["prompt_set"]},
    )
    empty = sum(n == 0 for n in table.column("n_tiles").to_pylist())
    log.info(
        "%d slides (%d without tiles), columns %s → %s",
        table.num_rows,
        empty,
        ", ".join(table.schema.names),
        snakemake.output.slides,
    )
