# Input functions, settings and output lists of the embedding stage (rules/embedding.smk).


def model_entry(wildcards):
    return config["models"][wildcards.model]


def model_inputs(wildcards):
    """Files a model is made from (as its backend says), so that a changed or newly trained model re-runs what
    used it."""
    from histoclip.embedding.backends import model_files as backend_model_files

    return backend_model_files(wildcards.model, config["models"][wildcards.model])


def model_files(model):
    """model_inputs() for a model named outright, as the per-model shard rules need it at parse time."""
    return model_inputs(wildcards_for(model=model))


def embedding_shards():
    return cohort_shards(config["embedding"]["shard_size"])


def embedding_shard_rules():
    """(model, shard, slide ids) for every embedding shard rule."""
    shards = embedding_shards()
    return [(model, shard, ids) for model in embedding_models() for shard, ids in shards.items()]


def embedding_shard_manifests(wildcards):
    return expand("results/embeddings/{model}/shards/{shard}.tsv", model=wildcards.model, shard=embedding_shards())


def embedding_manifest(wildcards):
    """The file that stands for all of a model's embedding files (what the cohort-wide rules take as input)."""
    return f"results/embeddings/{wildcards.model}.tsv"


def embedding_manifests(wildcards=None):
    return expand("results/embeddings/{model}.tsv", model=embedding_models())
