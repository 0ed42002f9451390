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
        embeddings=embedding_manifest,
    output:
        calls="results/zeroshot/{model}/{promptset}/calls.tsv",
        tile_scores=directory("results/zeroshot/{model}/{promptset}/tile_scores"),
    params:
        slides=lambda wildcards: slide_ids(),
        settings=zeroshot_call_settings(),
        sheet=config["slides"],
    log:
        "results/logs/zeroshot/{model}/{promptset}.log",
    threads: 1
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/zeroshot_calls.py"


# Prompt sensitivity: the zero-shot evaluation re-run for random sub-prompt-sets (one model load, each prompt
# encoded once, each held-out slide read once), then its figure.


rule prompt_sensitivity:
    input:
        prompts=prompt_set_path,
        model=model_inputs,
        classifier="results/zeroshot/{model}/{promptset}/text_classifier.parquet",
        calls="results/zeroshot/{model}/{promptset}/calls.tsv",
        embeddings=embedding_manifest,
    output:
        json="results/zeroshot/{model}/{promptset}/prompt_sensitivity.json",
        table="results/zeroshot/{model}/{promptset}/prompt_sensitivity.tsv",
    params:
        model=model_entry,
        search_dirs=[".", workflow.basedir],
        device=config["embedding"]["device"],
        slides=lambda wildcards: slide_ids(),
        settings=prompt_sensitivity_settings,
    log:
        "results/logs/prompt_sensitivity/{model}/{promptset}.log",
    threads: 2
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/prompt_sensitivity.py"


rule figure_prompt_sensitivity:
    input:
        json="results/zeroshot/{model}/{promptset}/prompt_sensitivity.json",
        table="results/zeroshot/{model}/{promptset}/prompt_sensitivity.tsv",
    output:
        **figure_outputs(
            "results/figures/zeroshot/{model}/{promptset}/prompt_sensitivity",
            caption="prompt_sensitivity.rst",
            category="2. Zero-shot calls",
            subcategory="{model} / {promptset}",
        ),
    params:
        style=figure_style,
    log:
        "results/logs/figures/prompt_sensitivity/{model}/{promptset}.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/figure_prompt_sensitivity.py"


rule prompt_sensitivity_all:
    input:
        prompt_sensitivity_outputs,
