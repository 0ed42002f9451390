# Patch embedding: one job per (model, shard of slides): one model load, one Parquet file per slide.
# The shard rules are made from the sheet at parse time (cheap: ids only, no slide is opened), with constant
# output paths (the model is written in, not a {model} wildcard): docs/architecture.md, "Planning".


include: "functions/embedding.smk"


for _model, _shard, _slides in embedding_shard_rules():

    rule:
        name:
            rule_name("embed", _model, _shard)
        input:
            # the tables of the tiling shards that made this shard's tile files stand for them (planning then
            # resolves a few files per job, not one per slide); the tile files themselves are params
            tiling=tiling_shard_tables_of(_slides),
            model=model_files(_model),
        output:
            # the shard's lines of the model's embedding manifest (first, as in tiling.smk)
            manifest=f"results/embeddings/{_model}/shards/{_shard}.tsv",
            embeddings=[f"results/embeddings/{_model}/{slide}.parquet" for slide in _slides],
        params:
            tiles=[f"results/tiles/{slide}.parquet" for slide in _slides],
            model_name=_model,
            model=config["models"][_model],
            # stage_dir and devices only say where slides are read from and which GPU runs the job: the job script
            # reads them from the config, so setting them (e.g. $TMPDIR for a cluster run) re-runs no finished job
            embedding={k: v for k, v in config["embedding"].items() if k not in ("stage_dir", "devices")},
            search_dirs=[".", workflow.basedir],
        log:
            f"results/logs/embed/{_model}/{_shard}.log",
        threads: config["embedding"]["threads"]
        resources:
            mem_mb=lambda wildcards, attempt: config["embedding"]["mem_mb"] * attempt,
            runtime=lambda wildcards, attempt: 240 * attempt,
            gpu=0 if config["embedding"]["device"] == "cpu" else 1,
        conda:
            "../envs/torch.yaml"
        script:
            "../scripts/embedding/embed_shard.py"


rule embedding_manifest:
    """One file that stands for a model's embedding files (see histoclip.cohort.aggregation.write_embedding_manifest):
    the shards' manifests, in sheet order."""
    input:
        shards=embedding_shard_manifests,
    output:
        manifest="results/embeddings/{model}.tsv",
    params:
        slides=lambda wildcards: slide_ids(),
    log:
        "results/logs/embedding_manifest/{model}.log",
    localrule: True
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/embedding/embedding_manifest.py"
