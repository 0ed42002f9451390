# Input functions, settings and output lists of the report_alignment stage (rules/report_alignment.smk).


def report_alignment_models():
    """Models that get report alignment: those with a text tower, when a reports table is set."""
    if not config["report_alignment"]["reports"]:
        return []
    return text_models()


def report_alignment_prompt_set(wildcards=None):
    """The prompt set whose called classes the report-style zero-shot uses (default: the first zero-shot one)."""
    name = config["report_alignment"]["prompt_set"]
    if name is None:
        names = prompt_set_names()
        if not names:
            raise ValueError(
                "report alignment's zero-shot needs a prompt set: set report_alignment.prompt_set or zeroshot.prompt_sets"
            )
        return names[0]
    return name


def report_alignment_training_settings(wildcards=None):
    return config_part("report_alignment", {"training": config["report_alignment"]["training"]})


def report_alignment_outputs(wildcards=None):
    """retrieval.json, calls.tsv and the retrieval figure per model with a text tower, when reports are given,
    the sheet exists and its train split (the slides the aligner is trained on) has enough patients."""
    if not Path(config["slides"]).exists() or len(train_patients()) < MIN_ALIGNMENT_PATIENTS:
        return []
    if not prompt_set_names() and not config["report_alignment"]["prompt_set"]:
        return []
    return expand(
        [
            "results/report_alignment/{model}/retrieval.json",
            "results/report_alignment/{model}/calls.tsv",
            "results/figures/report_alignment/{model}/retrieval.tsv",
        ],
        model=report_alignment_models(),
    )
