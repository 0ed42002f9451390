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
        "../scripts/fewshot.py"


rule fewshot_all:
    input:
        fewshot_outputs,
