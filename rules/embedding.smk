# Patch embedding: one job per shard of slides (one model load), one Parquet file per slide.
# The shard rules are made from the sheet at parse time (cheap: ids only, no slide is opened).


for _shard, _slides in embedding_shards().items():

    rule:
        name:
            f"embed_{_shard}"
        input:
            tiles=[f"results/tiles/{slide}.parquet" for slide in _slides],
            model=model_inputs,
        output:
            [f"results/embeddings/{{model}}/{slide}.parquet" for slide in _slides],
        params:
            model=model_entry,
            embedding=config["embedding"],
            search_dirs=[".", workflow.basedir],
        log:
            f"results/logs/embed/{{model}}/{_shard}.log",
        threads: config["embedding"]["threads"]
        resources:
            mem_mb=config["embedding"]["mem_mb"],
            runtime=240,
            gpu=0 if config["embedding"]["device"] == "cpu" else 1,
        conda:
            "../envs/torch.yaml"
        script:
            "../scripts/embed_shard.py"
