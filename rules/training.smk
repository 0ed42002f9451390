# Contrastive training / fine-tuning of CLIP models on image–text pairs, and the demo's training pairs.


rule demo_training_pairs:
    input:
        sheet=f"{DEMO_DIR}/slides.tsv",
        captions=f"{DEMO_DIR}/captions.tsv",
    output:
        pairs=f"{DEMO_DIR}/training_pairs.tsv",
    params:
        seed=config["demo"]["seed"],
    log:
        "results/logs/demo_training_pairs.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/demo_training_pairs.py"


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
        "../scripts/train_clip.py"
