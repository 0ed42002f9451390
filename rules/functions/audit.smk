# Input functions and output lists of the audit stage (rules/audit.smk).


def has_sites():
    """Whether the site audit can run: TCGA barcodes asked for, or a site column with a value."""
    if config["audit"]["site_from"] == "tcga_barcode":
        return True
    column = config["audit"]["site_column"]
    return any(str(record.extra.get(column, "")).strip() for record in cohort().values())


def audit_inputs(wildcards):
    """The sheet and slide embeddings, and the slide tables the default target makes for this model anyway
    (clusters, phenotypes, zero-shot calls, the survival tables): each adds its check."""
    model = wildcards.model
    inputs = {"sheet": config["slides"], "slides": f"results/slides/{model}.parquet"}
    inputs["clusters"] = f"results/clusters/{model}/slide_clusters.tsv"
    inputs["composition"] = f"results/phenotypes/{model}/composition.tsv"
    if has_text(model) and prompt_set_names():
        inputs["calls"] = f"results/zeroshot/{model}/{prompt_set_names()[0]}/calls.tsv"
    if config["clinical"] and config["survival"]["multivariable"] and model in survival_models():
        inputs["patients"] = f"results/survival/{model}/patients.tsv"
        inputs["cox"] = f"results/survival/{model}/cox_multivariable.tsv"
    return inputs


def audit_outputs(wildcards=None):
    if not Path(config["slides"]).exists() or not has_sites():
        return []
    return expand(
        ["results/audit/{model}/site.tsv", "results/figures/audit/{model}/site.tsv"], model=embedding_models()
    )
