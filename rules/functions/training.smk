# Input functions, settings and output lists of the training stage (rules/training.smk).


def training_inputs(wildcards):
    entry = config["training"][wildcards.trained]
    inputs = {"pairs": entry["pairs"]}
    if entry.get("sheet"):
        inputs["sheet"] = entry["sheet"]
    base = entry["base"]
    if base in config["models"]:
        backend = config["models"][base].get("backend", "open_clip")
        if backend != "open_clip":
            raise ValueError(
                f"training.{wildcards.trained}.base is model {base!r} (backend {backend}): contrastive training "
                "fine-tunes open_clip models only (a base with a text tower that open_clip builds)"
            )
        inputs["base"] = model_files(base)
    elif base.endswith(".json"):
        inputs["base"] = base
    return inputs
