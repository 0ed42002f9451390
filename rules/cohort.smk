# Cohort-level analyses of the tile embeddings: slide embeddings (mean of the tile embeddings, renormalised;
# optionally one top-K embedding per class of a prompt set), tile phenotypes (cohort-wide mini-batch k-means of
# tile embeddings, named by the nearest text class) and slide clustering (k-means on slide embeddings or
# phenotype compositions, k by silhouette, bootstrap stability).


include: "functions/cohort.smk"


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
        "../scripts/cohort/aggregate_slides.py"


rule slide_embeddings:
    input:
        slide_tables,


rule phenotypes:
    input:
        embeddings=embedding_manifest,
        classifiers=phenotype_classifiers,
    output:
        composition="results/phenotypes/{model}/composition.tsv",
        class_composition="results/phenotypes/{model}/class_composition.tsv",
        phenotypes=report(
            "results/phenotypes/{model}/phenotypes.tsv",
            caption="../config/report/phenotypes.rst",
            category="3. Phenotypes and clusters",
            subcategory="{model}",
        ),
        centroids="results/phenotypes/{model}/centroids.parquet",
        gallery_tiles="results/phenotypes/{model}/gallery_tiles.tsv",
        assignments=directory("results/phenotypes/{model}/assignments"),
    params:
        sheet=config["slides"],
        prompt_sets=model_prompt_sets,
        settings=phenotype_settings,
    log:
        "results/logs/phenotypes/{model}.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/cohort/phenotypes.py"


rule phenotype_gallery:
    input:
        gallery_tiles="results/phenotypes/{model}/gallery_tiles.tsv",
        phenotypes="results/phenotypes/{model}/phenotypes.tsv",
        cohort_qc="results/qc/cohort.tsv",  # stands for every tile file (it is made from them all)
    output:
        **figure_outputs(
            "results/figures/phenotypes/{model}/gallery",
            caption="phenotype_gallery.rst",
            category="3. Phenotypes and clusters",
            subcategory="{model}",
            tissue_images=True,
        ),
    params:
        style=figure_style,
        sheet=config["slides"],
        tiles=lambda wildcards: TILE_FILE,
    log:
        "results/logs/figures/phenotypes/{model}.log",
    conda:
        "../envs/gallery.yaml"
    script:
        "../scripts/cohort/figure_phenotype_gallery.py"


rule cluster_slides:
    input:
        unpack(slide_cluster_inputs),
    output:
        clusters="results/clusters/{model}/slide_clusters.tsv",
        summary="results/clusters/{model}/clustering.json",
    params:
        slides=lambda wildcards: slide_ids(),
        sheet=config["slides"],
        settings=clustering_settings,
    log:
        "results/logs/clusters/{model}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/cohort/cluster_slides.py"


rule figure_slide_map:
    input:
        unpack(slide_map_calls),
        clusters="results/clusters/{model}/slide_clusters.tsv",
        summary="results/clusters/{model}/clustering.json",
    output:
        **figure_outputs(
            "results/figures/clusters/{model}/slide_map",
            caption="slide_map.rst",
            category="3. Phenotypes and clusters",
            subcategory="{model}",
        ),
    params:
        style=figure_style,
        sheet=config["slides"],
    log:
        "results/logs/figures/clusters/{model}.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/cohort/figure_slide_map.py"


rule phenotypes_and_clusters:
    input:
        phenotype_outputs,
