# Input functions, settings and output lists of the export stage (rules/export.smk).


def export_shard_rules():
    """(model, shard, slide ids) of every per-slide export shard rule: the embedding shards of every model."""
    shards = embedding_shards()
    return [(model, shard, ids) for model in embedding_models() for shard, ids in shards.items()]


def export_prompt_sets(model):
    """The prompt sets whose tile scores and calls a model's exports carry (config order; none without a text
    tower). The first classifies the QuPath tiles, as it colours the slide map."""
    return prompt_set_names() if has_text(model) else []


def export_model_inputs(model):
    """What a model's per-slide exports read besides its embeddings: each prompt set's tile scores and calls, and
    the phenotypes (their table names them; the assignment folder holds one file per slide)."""
    sets = export_prompt_sets(model)
    return {
        "tile_scores": [f"results/zeroshot/{model}/{name}/tile_scores" for name in sets],
        "calls": [f"results/zeroshot/{model}/{name}/calls.tsv" for name in sets],
        "phenotypes": f"results/phenotypes/{model}/phenotypes.tsv",
        "assignments": f"results/phenotypes/{model}/assignments",
    }


def slides_anndata_inputs(wildcards):
    """Everything results/export/{model}/slides.h5ad is made of."""
    model = wildcards.model
    return {
        "slides": f"results/slides/{model}.parquet",
        "clusters": f"results/clusters/{model}/slide_clusters.tsv",
        "clustering": f"results/clusters/{model}/clustering.json",
        "composition": f"results/phenotypes/{model}/composition.tsv",
        "class_composition": f"results/phenotypes/{model}/class_composition.tsv",
        **{k: v for k, v in export_model_inputs(model).items() if k in ("calls", "phenotypes")},
    }


def _export_indexes(stem):
    if not Path(config["slides"]).exists():
        return []
    return [f"{stem.format(model=model)}/index/{shard}.tsv" for model, shard, _ in export_shard_rules()]


def qupath_outputs(wildcards=None):
    """The QuPath GeoJSON shards' index files (each lists its slides' files), every model."""
    return _export_indexes("results/qupath/{model}")


def tile_anndata_outputs(wildcards=None):
    return _export_indexes("results/export/{model}/tiles")


def mil_h5_outputs(wildcards=None):
    return _export_indexes("results/export/{model}/h5")


def slides_anndata_outputs(wildcards=None):
    return expand("results/export/{model}/slides.h5ad", model=embedding_models())


def export_outputs(wildcards=None):
    """The exports of the default target: QuPath GeoJSON and the slides' AnnData always; tile AnnData and the
    CLAM/TRIDENT HDF5 when export.tile_anndata / export.mil_h5 ask for them (each a full copy of the tile
    embeddings, in float32: twice the float16 embedding files)."""
    outputs = [*qupath_outputs(), *slides_anndata_outputs()]
    if config["export"]["tile_anndata"]:
        outputs += tile_anndata_outputs()
    if config["export"]["mil_h5"]:
        outputs += mil_h5_outputs()
    return outputs
