# Zero-shot subtype calls: text classifier per (model, prompt set), tile scores and slide calls; prompt
# sensitivity; few-shot against zero-shot; per-slide evidence; retrieval in the image–text space.


include: "functions/zeroshot.smk"


rule encode_prompts:
    input:
        prompts=prompt_set_path,
        model=text_model_inputs,
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
        "../scripts/zeroshot/encode_prompts.py"


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
        "../scripts/zeroshot/zeroshot_calls.py"


# Prompt sensitivity: the zero-shot evaluation re-run for random sub-prompt-sets (one model load, each prompt
# encoded once, each held-out slide read once), then its figure.


rule prompt_sensitivity:
    input:
        prompts=prompt_set_path,
        model=text_model_inputs,
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
        "../scripts/zeroshot/prompt_sensitivity.py"


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
        "../scripts/zeroshot/figure_prompt_sensitivity.py"


rule prompt_sensitivity_all:
    input:
        prompt_sensitivity_outputs,


# Few-shot slide classification on slide embeddings (prototype and logistic-regression probe), against
# zero-shot on the same held-out slides.


rule fewshot:
    input:
        slides="results/slides/{model}.parquet",
        calls="results/zeroshot/{model}/{promptset}/calls.tsv",
    output:
        results="results/fewshot/{model}/{promptset}/fewshot.tsv",
        summary=report(
            "results/fewshot/{model}/{promptset}/summary.tsv",
            caption="../config/report/fewshot_summary.rst",
            category="3. Few-shot",
            subcategory="{model} / {promptset}",
        ),
        **figure_outputs(
            "results/figures/fewshot/{model}/{promptset}/balanced_accuracy_vs_k",
            caption="fewshot.rst",
            category="3. Few-shot",
            subcategory="{model} / {promptset}",
        ),
    params:
        settings=fewshot_settings,
        style=figure_style,
    log:
        "results/logs/fewshot/{model}/{promptset}.log",
    threads: 1
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/zeroshot/fewshot.py"


# The same for a model without a text tower: the labelled slides and classes from the cohort sheet (its labels,
# sorted), no zero-shot line. Its own path (labels, not a prompt set); the model constraint and the rule order
# keep it apart from rule fewshot, which still makes a text model's prompt set named "labels".


ruleorder: fewshot_labels > fewshot


rule fewshot_labels:
    input:
        slides="results/slides/{model}.parquet",
    output:
        results="results/fewshot/{model}/labels/fewshot.tsv",
        summary=report(
            "results/fewshot/{model}/labels/summary.tsv",
            caption="../config/report/fewshot_summary.rst",
            category="3. Few-shot",
            subcategory="{model} / sheet labels",
        ),
        **figure_outputs(
            "results/figures/fewshot/{model}/labels/balanced_accuracy_vs_k",
            caption="fewshot.rst",
            category="3. Few-shot",
            subcategory="{model} / sheet labels",
        ),
    wildcard_constraints:
        model=image_only_model_pattern(),
    params:
        settings=fewshot_settings,
        style=figure_style,
        sheet=config["slides"],
    log:
        "results/logs/fewshot/{model}/labels.log",
    threads: 1
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/zeroshot/fewshot.py"


rule fewshot_all:
    input:
        fewshot_outputs,


# Evidence: one job per shard of slides (the embedding shards, embedding.shard_size slides each), so a cohort is
# not thousands of two-second jobs; every slide still has its own figure, and asking for one builds its shard.
# One rule per (model, prompt set, shard) with constant output paths (docs/architecture.md, "Planning").
for _model, _promptset, _shard, _slides in evidence_shard_rules():

    rule:
        name:
            rule_name("zeroshot_evidence", _model, _promptset, _shard)
        input:
            tile_scores=f"results/zeroshot/{_model}/{_promptset}/tile_scores",
            calls=f"results/zeroshot/{_model}/{_promptset}/calls.tsv",
        output:
            # the shard's slides and their figures: what the default target asks for (one file per shard keeps
            # planning a 10,000-slide cohort from resolving 10,000 more targets)
            index=f"results/zeroshot/{_model}/{_promptset}/evidence/index/{_shard}.tsv",
            # PNG only, whatever figures.formats says: one figure per slide of a cohort is for looking, not print.
            png=[
                report(
                    f"results/zeroshot/{_model}/{_promptset}/evidence/{slide}.png",
                    caption="../config/report/zeroshot_evidence.rst",
                    category="2. Zero-shot calls",
                    subcategory=f"{_model} / {_promptset}: evidence per slide",
                )
                for slide in _slides
            ],
            tsv=[f"results/zeroshot/{_model}/{_promptset}/evidence/{slide}.tsv" for slide in _slides],
        params:
            slides=_slides,
            # Made before the calls these jobs read, so params, not inputs: a 10,000-slide cohort then plans
            # without resolving 30,000 more files (the tiling shard writes tile file and thumbnail together).
            tiles=[f"results/tiles/{slide}.parquet" for slide in _slides],
            thumbnails=[f"results/qc/{slide}.png" for slide in _slides],
            slide_files=slide_files(_slides),
            style=figure_style,
            options={"figures": {"evidence": config["figures"]["evidence"]}},
            zeroshot={"pooling": config["zeroshot"]["pooling"], "top_k": config["zeroshot"]["top_k"]},
        log:
            f"results/logs/zeroshot_evidence/{_model}/{_promptset}/{_shard}.log",
        threads: 1
        conda:
            "../envs/retrieval.yaml"
        script:
            "../scripts/zeroshot/zeroshot_evidence.py"


rule retrieve_tiles:
    input:
        model=text_model_inputs,
        embeddings=embedding_manifest,
        cohort_qc="results/qc/cohort.tsv",  # stands for every tile file (it is made from them all)
        class_maps=demo_class_maps,
    output:
        table="results/retrieval/{model}/text_to_tiles.tsv",
        **retrieval_gallery_outputs(),
    params:
        settings={k: config["retrieval"][k] for k in ("queries", "top_n")},
        model=model_entry,
        search_dirs=[".", workflow.basedir],
        device=config["embedding"]["device"],
        sheet=config["slides"],
        slides=lambda wildcards: slide_ids(),
        tiles=tile_files,
        style=figure_style,
    log:
        "results/logs/retrieval/{model}/text_to_tiles.log",
    threads: 2
    conda:
        "../envs/retrieval.yaml"
    script:
        "../scripts/zeroshot/retrieve_tiles.py"


rule slide_neighbours:
    input:
        slides="results/slides/{model}.parquet",
    output:
        table=report(
            "results/retrieval/{model}/slide_neighbours.tsv",
            caption="../config/report/slide_neighbours.rst",
            category="5. Retrieval",
            subcategory="{model}: slide → slides",
        ),
        summary="results/retrieval/{model}/slide_retrieval.json",
    params:
        settings={k: config["retrieval"][k] for k in ("neighbours", "exclude_same_patient")},
        sheet=config["slides"],
        slides=lambda wildcards: slide_ids(),
    log:
        "results/logs/retrieval/{model}/slide_neighbours.log",
    threads: 1
    conda:
        "../envs/retrieval.yaml"
    script:
        "../scripts/zeroshot/slide_neighbours.py"


rule evidence:
    """Named target: every slide's zero-shot evidence figure."""
    input:
        evidence_figures,


rule retrieval:
    """Named target: text → tiles galleries and slide neighbours for every embedding model."""
    input:
        retrieval_outputs,
