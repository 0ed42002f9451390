# Input functions, settings and output lists of the cohort stage (rules/cohort.smk).


def aggregation_prompt_set():
    """The prompt set whose tile scores give the per-class top-K slide embeddings (None: mean only)."""
    name = config["aggregation"]["class_embeddings"]
    if name is not None and name not in prompt_set_names():
        raise ValueError(
            f"aggregation.class_embeddings is {name!r}, which is not a prompt set of zeroshot.prompt_sets "
            f"({prompt_set_names()}): add it there, or set aggregation.class_embeddings to null"
        )
    return name


def model_prompt_sets(wildcards):
    """The prompt sets a model's cohort analyses use: none for a model without a text tower."""
    return prompt_set_names() if has_text(wildcards.model) else []


def aggregation_tile_scores(wildcards):
    name = aggregation_prompt_set() if has_text(wildcards.model) else None
    return [f"results/zeroshot/{wildcards.model}/{name}/tile_scores"] if name else []


def aggregation_settings(wildcards):
    top_k = config["aggregation"]["class_top_k"] or config["zeroshot"]["top_k"]
    prompt_set = aggregation_prompt_set() if has_text(wildcards.model) else None
    return {"prompt_set": prompt_set, "class_top_k": top_k}


def slide_tables(wildcards=None):
    return expand("results/slides/{model}.parquet", model=embedding_models())


def phenotype_settings(wildcards=None):
    return config_part("phenotypes", config["phenotypes"])


def clustering_settings(wildcards=None):
    return config_part("clustering", config["clustering"])


def phenotype_classifiers(wildcards):
    """Text classifiers of every prompt set (the first one names the phenotypes in class_composition.tsv); none
    for a model without a text tower (its phenotypes are numbered, not named)."""
    return expand(
        "results/zeroshot/{model}/{promptset}/text_classifier.parquet",
        model=wildcards.model,
        promptset=model_prompt_sets(wildcards),
    )


def slide_cluster_inputs(wildcards):
    """Slide features for clustering: phenotype compositions, or slide embeddings (the aggregation stage's table
    when the workflow has one, else the tile embeddings, averaged by the clustering job itself)."""
    if config["clustering"]["slide_features"] == "composition":
        return {"composition": f"results/phenotypes/{wildcards.model}/composition.tsv"}
    if hasattr(rules, "aggregate"):  # absent where the workflow is used as a module without rules/cohort.smk
        return {"slide_embeddings": f"results/slides/{wildcards.model}.parquet"}
    return {"embeddings": embedding_manifest(wildcards)}


def slide_map_calls(wildcards):
    """Zero-shot calls of the first prompt set, to colour the slide map by (none without prompt sets or a text
    tower)."""
    names = model_prompt_sets(wildcards)
    return {"calls": f"results/zeroshot/{wildcards.model}/{names[0]}/calls.tsv"} if names else {}


def phenotype_outputs(wildcards=None):
    """Everything the phenotype and clustering stages make, per model (the `phenotypes` target)."""
    return expand(
        [
            "results/phenotypes/{model}/composition.tsv",
            "results/phenotypes/{model}/class_composition.tsv",
            "results/figures/phenotypes/{model}/gallery.tsv",
            "results/clusters/{model}/slide_clusters.tsv",
            "results/figures/clusters/{model}/slide_map.tsv",
        ],
        model=embedding_models(),
    )
