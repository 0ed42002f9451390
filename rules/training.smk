# Contrastive training / fine-tuning of CLIP models on image–text pairs.


include: "functions/training.smk"


rule train_clip:
    input:
        unpack(training_inputs),
    output:
        weights="results/models/{trained}/open_clip_model.safetensors",
        model_config="results/models/{trained}/open_clip_config.json",
        loss="results/models/{trained}/loss.tsv",
    params:
        training=lambda wildcards: config["training"][wildcards.trained],
        models=config["models"],
        search_dirs=[".", workflow.basedir],
        device=config["embedding"]["device"],
    log:
        "results/logs/train_clip/{trained}.log",
    threads: 8
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=0 if config["embedding"]["device"] == "cpu" else 1,
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/training/train_clip.py"
