# Zero-shot subtype calls: text classifier per (model, prompt set), then tile scores and slide calls.


rule encode_prompts:
    input:
        prompts=prompt_set_path,
        model=model_inputs,
    output:
        classifier="results/zeroshot/{model}/{promptset}/text_classifier.parquet",
    params:
        model=model_entry,
        search_dirs=[".", workflow.basedir],
        device=config["embedding"]["device"],
    log:
        "results/logs/encode_prompts/{model}/{promptset}.log",
    threads: 2
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/encode_prompts.py"


rule zeroshot:
    input:
        classifier="results/zeroshot/{model}/{promptset}/text_classifier.parquet",
        embeddings=model_embeddings,
    output:
        calls="results/zeroshot/{model}/{promptset}/calls.tsv",
        tile_scores=directory("results/zeroshot/{model}/{promptset}/tile_scores"),
    params:
        slides=lambda wildcards: slide_ids(),
        settings={k: v for k, v in config["zeroshot"].items() if k != "prompt_sets"} | {"seed": config["seed"]},
        sheet=config["slides"],
    log:
        "results/logs/zeroshot/{model}/{promptset}.log",
    threads: 1
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/zeroshot_calls.py"
