# Site audit: whether slide embeddings, clusters, phenotypes, zero-shot calls and Cox models follow the hospital a
# slide came from (the sheet's site column, or TCGA barcodes' tissue-source-site codes).


include: "functions/audit.smk"


rule audit_site:
    input:
        unpack(audit_inputs),
    output:
        table=report(
            "results/audit/{model}/site.tsv",
            caption="../config/report/audit_site.rst",
            category="7. Site audit",
            subcategory="{model}",
        ),
        **figure_outputs(
            "results/figures/audit/{model}/site",
            caption="audit_site.rst",
            category="7. Site audit",
            subcategory="{model}",
        ),
    params:
        settings=config_part("audit", config["audit"]),
        penalizer=config["survival"]["penalizer"],
        style=figure_style,
    log:
        "results/logs/audit/{model}/site.log",
    threads: 1
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/audit/audit_site.py"
