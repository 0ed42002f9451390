# Input functions, settings and output lists of the figures stage (rules/figures.smk).


def zeroshot_figures(wildcards=None):
    """Confusion and ROC figures per (model, prompt set); only when the sheet has labels to evaluate."""
    if not Path(config["slides"]).exists() or not has_labels():
        return []
    return expand(
        "results/figures/zeroshot/{model}/{promptset}/{figure}.tsv",
        model=text_models(),
        promptset=prompt_set_names(),
        figure=("confusion", "roc"),
    )
