# Slide–report alignment on the frozen tile embeddings: reports embedded by the model's text tower, an attention
# pooler and projections trained on the train split, report ↔ slide retrieval and report-style slide zero-shot
# on the held-out slides (histoclip.report_alignment).


include: "functions/report_alignment.smk"


rule encode_reports:
    input:
        reports=config["report_alignment"]["reports"] or [],
        model=text_model_inputs,
        prompts=lambda wildcards: prompt_set_path(wildcards_for(promptset=report_alignment_prompt_set())),
    output:
        reports="results/report_alignment/{model}/reports.parquet",
        classifier="results/report_alignment/{model}/report_style_classifier.parquet",
    params:
        model=model_entry,
        search_dirs=[".", workflow.basedir],
        device=config["embedding"]["device"],
        sheet=config["slides"],
        max_chunk_chars=config["report_alignment"]["max_chunk_chars"],
        templates=config["report_alignment"]["templates"],
    log:
        "results/logs/report_alignment/{model}/encode_reports.log",
    threads: 2
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/report_alignment/encode_reports.py"


rule train_alignment:
    input:
        reports=config["report_alignment"]["reports"] or [],
        report_embeddings="results/report_alignment/{model}/reports.parquet",
        embeddings=embedding_manifest,
    output:
        weights="results/report_alignment/{model}/aligner.safetensors",
        history="results/report_alignment/{model}/training.tsv",
    params:
        sheet=config["slides"],
        settings=report_alignment_training_settings,
    log:
        "results/logs/report_alignment/{model}/train.log",
    threads: 2
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/report_alignment/train_alignment.py"


rule report_alignment:
    input:
        reports=config["report_alignment"]["reports"] or [],
        report_embeddings="results/report_alignment/{model}/reports.parquet",
        classifier="results/report_alignment/{model}/report_style_classifier.parquet",
        weights="results/report_alignment/{model}/aligner.safetensors",
        embeddings=embedding_manifest,
        tile_calls=lambda wildcards: f"results/zeroshot/{wildcards.model}/{report_alignment_prompt_set()}/calls.tsv",
        cohort_qc="results/qc/cohort.tsv",  # stands for every tile file and thumbnail (made with them)
    output:
        retrieval="results/report_alignment/{model}/retrieval.json",
        calls="results/report_alignment/{model}/calls.tsv",
        comparison=report(
            "results/report_alignment/{model}/comparison.tsv",
            caption="../config/report/report_alignment.rst",
            category="6. Report alignment",
            subcategory="{model}",
        ),
        attention=directory("results/report_alignment/{model}/attention"),
        **figure_outputs(
            "results/figures/report_alignment/{model}/retrieval",
            caption="report_alignment.rst",
            category="6. Report alignment",
            subcategory="{model}",
        ),
    params:
        sheet=config["slides"],
        tiles=lambda wildcards: TILE_FILE,
        settings={k: config["report_alignment"][k] for k in ("recall_at", "attention_slides", "top_n")},
        zeroshot={k: config["zeroshot"][k] for k in ("abstain_margin", "bootstrap")},
        seed=config["seed"],
        style=figure_style,
    log:
        "results/logs/report_alignment/{model}/evaluate.log",
    threads: 1
    conda:
        "../envs/retrieval.yaml"
    script:
        "../scripts/report_alignment/report_alignment.py"


rule report_alignment_all:
    """Named target: report alignment of every model with a text tower."""
    input:
        report_alignment_outputs,
