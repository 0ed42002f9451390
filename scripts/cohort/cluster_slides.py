"""Rule cluster_slides: slide features → slide_clusters.tsv (+ 2-D map coordinates) and clustering.json."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.cohort.clustering import (
    ClusteringSettings,
    cluster_slides,
    composition_features,
    read_slide_embeddings,
    slide_embeddings_from_tiles,
    write_clustering,
)
from histoclip.formats import embedding_paths
from histoclip.logs import rule_log
from histoclip.sheets import read_cohort_sheet

with rule_log(snakemake.log[0], "histoclip.cohort.clustering") as log:
    settings = ClusteringSettings.from_config(snakemake.params.settings)
    if hasattr(snakemake.input, "composition"):
        features = composition_features(snakemake.input.composition)
    elif hasattr(snakemake.input, "slide_embeddings"):
        features = read_slide_embeddings(snakemake.input.slide_embeddings)
    else:
        records = {r.slide_id: r for r in read_cohort_sheet(snakemake.params.sheet)}
        slides = list(snakemake.params.slides)
        features = slide_embeddings_from_tiles(
            slides, [records[s].patient_id for s in slides], embedding_paths(snakemake.input.embeddings, slides)
        )
    table, summary = cluster_slides(features, settings)
    write_clustering(table, summary, snakemake.output.clusters, snakemake.output.summary)
    stability = summary["stability"]
    log.info(
        "%d slides (%s features) in k = %d clusters (%s), sizes %s; stability ARI median %s, 95 %% interval %s",
        summary["n_slides"],
        summary["features"],
        summary["k"],
        summary["k_chosen_by"],
        summary["cluster_sizes"],
        stability["ari_median"],
        stability["ari_interval_95"],
    )
