# Slide embeddings: one vector per slide (mean of its tile embeddings, renormalised; optionally one top-K
# embedding per class of a prompt set), read one slide at a time into results/slides/{model}.parquet.


rule aggregate:
    input:
        embeddings=embedding_manifest,
        tile_scores=aggregation_tile_scores,
    output:
        slides="results/slides/{model}.parquet",
    params:
        slides=lambda wildcards: slide_ids(),
        patients=slide_patients,
        settings=aggregation_settings,
    log:
        "results/logs/aggregate/{model}.log",
    threads: 1
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/aggregate_slides.py"


rule slide_embeddings:
    input:
        slide_tables,
