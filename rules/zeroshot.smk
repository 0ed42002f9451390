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


# Evidence: one job per (model, prompt set) that draws a bounded selection of slides (figures.evidence: the most
# confident calls per class, every misclassified slide and abstention, up to max_slides), chosen from the calls,
# so the figures are a directory and evidence.tsv says which slides are in it and why.
rule zeroshot_evidence:
    input:
        tile_scores="results/zeroshot/{model}/{promptset}/tile_scores",
        calls="results/zeroshot/{model}/{promptset}/calls.tsv",
    output:
        index="results/zeroshot/{model}/{promptset}/evidence.tsv",
        # PNG only, whatever figures.formats says: evidence figures are for looking, not print. The report shows
        # their JPEG copies at figures.report_px.
        figures=report(
            directory("results/zeroshot/{model}/{promptset}/evidence"),
            patterns=["{evidence_slide}.report.jpg"],
            caption="../config/report/zeroshot_evidence.rst",
            category="2. Zero-shot calls",
            subcategory="{model} / {promptset}: evidence (selected slides)",
        ),
    params:
        # Made before the calls this job reads (the tiling shard writes tile file and thumbnail together), so
        # params, not inputs: the job needs a few slides' files, chosen from the calls.
        tiles=lambda wildcards: TILE_FILE,  # per slide id (str.format)
        thumbnails=lambda wildcards: "results/qc/{slide}.png",
        sheet=config["slides"],
        style=figure_style,
        options={"figures": {"evidence": config["figures"]["evidence"]}},
        zeroshot={"pooling": config["zeroshot"]["pooling"], "top_k": config["zeroshot"]["top_k"]},
    log:
        "results/logs/zeroshot_evidence/{model}/{promptset}.log",
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
        tiles=lambda wildcards: TILE_FILE,  # per slide id (str.format): no per-slide list in the report
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
    log:
        "results/logs/retrieval/{model}/slide_neighbours.log",
    threads: 1
    conda:
        "../envs/retrieval.yaml"
    script:
        "../scripts/zeroshot/slide_neighbours.py"


rule evidence:
    """Named target: the zero-shot evidence figures of the selected slides (figures.evidence), per model and prompt set."""
    input:
        evidence_figures,


rule retrieval:
    """Named target: text → tiles galleries and slide neighbours for every embedding model."""
    input:
        retrieval_outputs,
