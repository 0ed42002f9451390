# Paper figures drawn from stage outputs (one shared style, config key `figures`), each with its source data
# as TSV beside it, and the `figures` target that gathers every figure of the workflow.


include: "functions/figures.smk"


rule figure_cohort_qc:
    input:
        cohort="results/qc/cohort.tsv",
    output:
        **figure_outputs("results/figures/cohort_qc", caption="cohort_qc.rst", category="1. Cohort"),
    params:
        style=figure_style,
    log:
        "results/logs/figures/cohort_qc.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/figures/figure_cohort_qc.py"


rule figure_zeroshot:
    input:
        calls="results/zeroshot/{model}/{promptset}/calls.tsv",
    output:
        **figure_outputs(
            "results/figures/zeroshot/{model}/{promptset}/confusion",
            name="confusion",
            caption="zeroshot_confusion.rst",
            category="2. Zero-shot calls",
            subcategory="{model} / {promptset}",
        ),
        **figure_outputs(
            "results/figures/zeroshot/{model}/{promptset}/roc",
            name="roc",
            caption="zeroshot_roc.rst",
            category="2. Zero-shot calls",
            subcategory="{model} / {promptset}",
        ),
    params:
        style=figure_style,
    log:
        "results/logs/figures/zeroshot/{model}/{promptset}.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/figures/figure_zeroshot.py"


rule figures:
    input:
        figure_files,
