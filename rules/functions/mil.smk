# Input functions, settings and output lists of the MIL stage (rules/mil.smk).

#: The `mil` keys that decide training and how it runs (evidence, deploy and the task list re-train nothing when they change).
MIL_TRAINING_KEYS = (
    "folds",
    "validation_fraction",
    "max_epochs",
    "patience",
    "learning_rate",
    "weight_decay",
    "hidden_dim",
    "dropout",
    "max_train_tiles",
    "device",
    "threads",
    "bag_cache_mb",
)


def mil_settings(wildcards=None):
    """What MilSettings.from_config reads: the training keys of `mil` and the seed."""
    return config_part("mil", {k: config["mil"][k] for k in MIL_TRAINING_KEYS})


def mil_task(wildcards):
    if wildcards.task not in config["mil"]["tasks"]:
        raise ValueError(f"MIL task {wildcards.task!r} is not in mil.tasks ({sorted(config['mil']['tasks'])})")
    return config["mil"]["tasks"][wildcards.task]


def mil_tasks_ready():
    """The tasks whose label column the sheet has (with at least one value): the others are logged as left out."""
    if not Path(config["slides"]).exists():
        return []
    columns = set()
    for record in cohort().values():
        if record.label:
            columns.add("label")
        columns.update(k for k, v in record.extra.items() if str(v).strip())
    return [name for name, task in config["mil"]["tasks"].items() if task["label_column"] in columns]


def mil_models():
    return list(config["mil"]["models"])


def mil_comparison_tasks():
    """Tasks compared with zero-shot and few-shot: those on the sheet's `label` column (the one zero-shot is scored
    on), when few-shot runs (labels and a train split) and there is a prompt set."""
    if not prompt_set_names() or not has_train_split():
        return []
    return [name for name in mil_tasks_ready() if config["mil"]["tasks"][name]["label_column"] == "label"]


def mil_comparison_prompt_set():
    return prompt_set_names()[0]


def mil_outputs(wildcards=None):
    """Per embedding model and ready task: each MIL model's calls and evaluation, the task's calls, the attention
    evidence of abmil, and the comparison figure (text models, tasks on `label`)."""
    tasks = mil_tasks_ready()
    if not tasks:
        return []
    outputs = expand(
        "results/mil/{model}/{task}/{milmodel}/evaluation.json",
        model=embedding_models(),
        task=tasks,
        milmodel=mil_models(),
    )
    outputs += expand("results/mil/{model}/{task}/calls.tsv", model=embedding_models(), task=tasks)
    if "abmil" in mil_models() and config["mil"]["evidence_slides"] > 0:
        outputs += expand("results/mil/{model}/{task}/abmil/evidence.tsv", model=embedding_models(), task=tasks)
    outputs += expand(
        "results/figures/mil/{model}/{task}/comparison.tsv", model=text_models(), task=mil_comparison_tasks()
    )
    return outputs


def mil_deploy_outputs(wildcards=None):
    return expand("results/mil/deploy/{name}/calls.tsv", name=list(config["mil"]["deploy"]))


def mil_deploy_entry(wildcards):
    return config["mil"]["deploy"][wildcards.name]


def mil_deploy_manifest(wildcards):
    return f"results/embeddings/{mil_deploy_entry(wildcards)['embedding_model']}.tsv"
