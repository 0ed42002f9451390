# Survival: per model, the clinical table + slide outputs → patient table, Cox models (univariable, multivariable,
# proportional-hazards tests), cross-validated c-index, Kaplan–Meier tables with log-rank tests; then the forest
# and Kaplan–Meier figures. Inputs and the list of groupings come from the `survival` config.


include: "functions/survival.smk"


rule survival:
    input:
        unpack(survival_inputs),
    output:
        patients="results/survival/{model}/patients.tsv",
        univariable="results/survival/{model}/cox_univariable.tsv",
        multivariable=report(
            "results/survival/{model}/cox_multivariable.tsv",
            caption="../config/report/survival_cox.rst",
            category="6. Survival",
            subcategory="{model}",
        ),
        cindex=report(
            "results/survival/{model}/cindex.tsv",
            caption="../config/report/survival_cindex.rst",
            category="6. Survival",
            subcategory="{model}",
        ),
        km=expand("results/survival/{{model}}/km_{name}.tsv", name=survival_grouping_names()),
        logrank=expand("results/survival/{{model}}/km_{name}_logrank.tsv", name=survival_grouping_names()),
    params:
        settings=survival_settings(),
    log:
        "results/logs/survival/{model}.log",
    threads: 1
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/survival/survival.py"


rule figure_survival:
    input:
        univariable="results/survival/{model}/cox_univariable.tsv",
        multivariable="results/survival/{model}/cox_multivariable.tsv",
        km=expand("results/survival/{{model}}/km_{name}.tsv", name=survival_grouping_names()),
        logrank=expand("results/survival/{{model}}/km_{name}_logrank.tsv", name=survival_grouping_names()),
    output:
        **figure_outputs(
            "results/figures/survival/{model}/forest",
            name="forest",
            caption="survival_forest.rst",
            category="6. Survival",
            subcategory="{model}",
        ),
        **survival_km_figure_outputs(),
    params:
        style=figure_style,
        names=survival_grouping_names(),
        time_unit=config["survival"]["time_unit"],
    log:
        "results/logs/figures/survival/{model}.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/survival/figure_survival.py"


rule survival_all:
    input:
        survival_tables,
        survival_figures,
        survival_multimodal_outputs,


# Image + clinical survival: clinical-only, image-only (penalised Cox on PCA of the slide embeddings, fitted inside
# each training fold) and combined Cox models, cross-validated c-index on the same folds, and their figure.


rule survival_multimodal:
    input:
        clinical=config["clinical"] or [],
        sheet=config["slides"],
        slides="results/slides/{model}.parquet",
    output:
        table=report(
            "results/survival/{model}/cindex_multimodal.tsv",
            caption="../config/report/survival_multimodal.rst",
            category="6. Survival",
            subcategory="{model}",
        ),
        **figure_outputs(
            "results/figures/survival/{model}/cindex_multimodal",
            caption="survival_multimodal.rst",
            category="6. Survival",
            subcategory="{model}",
        ),
    params:
        settings=survival_settings(),
        style=figure_style,
    log:
        "results/logs/survival/{model}_multimodal.log",
    threads: 1
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/survival/survival_multimodal.py"
