# Input functions, settings and output lists of the zeroshot stage (rules/zeroshot.smk).


def prompt_set_path(wildcards):
    """config/prompts/{name}.yaml (or .json), or the path given in zeroshot.prompt_sets."""
    for entry in config["zeroshot"]["prompt_sets"]:
        if entry.endswith((".yaml", ".yml", ".json")) and Path(entry).stem == wildcards.promptset:
            return entry
    for suffix in (".yaml", ".yml", ".json"):
        for folder in (Path("config/prompts"), Path(workflow.basedir) / "config" / "prompts"):
            if (folder / f"{wildcards.promptset}{suffix}").exists():
                return str(folder / f"{wildcards.promptset}{suffix}")
    raise ValueError(
        f"prompt set {wildcards.promptset!r} not found in config/prompts/ (.yaml or .json): "
        "add the file or give its path in zeroshot.prompt_sets"
    )


def zeroshot_calls(wildcards=None):
    return expand(
        "results/zeroshot/{model}/{promptset}/calls.tsv", model=text_models(), promptset=prompt_set_names()
    )


def zeroshot_call_settings():
    """The zeroshot keys of a slide call (histoclip.zeroshot.calls.CallSettings) and the seed; the prompt-sensitivity
    keys are only params of the rules that use them, so changing them re-runs nothing else."""
    skip = {"prompt_sets", "n_subsets", "template_fraction", "synonym_fraction"}
    return config_part("zeroshot", {k: v for k, v in config["zeroshot"].items() if k not in skip})


def prompt_sensitivity_settings(wildcards=None):
    """Zero-shot call settings plus the subset draws: what decides the prompt-sensitivity numbers."""
    keys = ("pooling", "top_k", "lse_temperature", "abstain_margin")
    keys += ("n_subsets", "template_fraction", "synonym_fraction")
    return config_part("zeroshot", {k: config["zeroshot"][k] for k in keys})


def prompt_sensitivity_outputs(wildcards=None):
    """Prompt-sensitivity tables and figures per (model, prompt set); only when the sheet has labels."""
    if not Path(config["slides"]).exists() or not has_labels():
        return []
    return expand(
        [
            "results/zeroshot/{model}/{promptset}/prompt_sensitivity.json",
            "results/figures/zeroshot/{model}/{promptset}/prompt_sensitivity.tsv",
        ],
        model=text_models(),
        promptset=prompt_set_names(),
    )


def fewshot_settings(wildcards=None):
    return config_part("fewshot", config["fewshot"])


def fewshot_outputs(wildcards=None):
    """Few-shot tables and figures per (model, prompt set), and per model without a text tower (labels from the
    sheet, no zero-shot); only when the sheet has labels and a train split to draw shots from."""
    if not Path(config["slides"]).exists() or not has_labels() or not has_train_split():
        return []
    stems = ["results/fewshot/{model}/{promptset}/summary.tsv"]
    stems.append("results/figures/fewshot/{model}/{promptset}/balanced_accuracy_vs_k.tsv")
    image_only = [model for model in embedding_models() if not has_text(model)]
    return [
        *expand(stems, model=text_models(), promptset=prompt_set_names()),
        *expand(stems, model=image_only, promptset="labels"),
    ]


def image_only_model_pattern():
    """The model wildcard constraint of the fewshot_labels rule: embedding models without a text tower."""
    return "|".join(re.escape(model) for model in embedding_models() if not has_text(model)) or "(?!)"


def evidence_figures(wildcards=None):
    """The evidence index (evidence.tsv: the selected slides, why, and their figures) per (model, prompt set)."""
    if not Path(config["slides"]).exists():
        return []
    return expand(
        "results/zeroshot/{model}/{promptset}/evidence.tsv", model=text_models(), promptset=prompt_set_names()
    )


def retrieval_query_slugs():
    """File stems of retrieval.queries' galleries (parse time: config only; a slug collision is an error here)."""
    from histoclip.zeroshot.prompts import query_slugs  # not histoclip.zeroshot.retrieval: every job parses this (matplotlib)

    return query_slugs(config["retrieval"]["queries"])


def retrieval_gallery_outputs():
    """Named outputs of every query's gallery: q{i}_{format} for each figure format and q{i}_tsv."""
    outputs = {}
    for i, slug in enumerate(retrieval_query_slugs()):
        outputs |= figure_outputs(
            f"results/retrieval/{{model}}/text_to_tiles/{slug}",
            name=f"q{i}",
            caption="retrieval_gallery.rst",
            category="5. Retrieval",
            subcategory="{model}: text → tiles",
            tissue_images=True,
        )
    return outputs


def retrieval_outputs(wildcards=None):
    """Retrieval tables per embedding model: slide neighbours and precision@k for every model, text → tiles for
    the models with a text tower."""
    if not Path(config["slides"]).exists():
        return []
    with_queries = text_models() if config["retrieval"]["queries"] else []
    return expand("results/retrieval/{model}/text_to_tiles.tsv", model=with_queries) + expand(
        ["results/retrieval/{model}/slide_neighbours.tsv", "results/retrieval/{model}/slide_retrieval.json"],
        model=embedding_models(),
    )


def text_model_inputs(wildcards):
    """model_inputs() of a rule that needs the model's text tower; a model without one is refused here, by name,
    when such an output is asked for."""
    if not has_text(wildcards.model):
        backend = config["models"][wildcards.model].get("backend")
        raise ValueError(
            f"model {wildcards.model!r} (backend {backend}) has no text tower: zero-shot calls, evidence, text → tile "
            "retrieval, prompt sensitivity and training need a vision-language model (open_clip, conch, hf-clip)"
        )
    return model_inputs(wildcards)
