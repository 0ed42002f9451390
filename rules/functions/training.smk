# Input functions, settings and output lists of the training stage (rules/training.smk).


def training_inputs(wildcards):
    entry = config["training"][wildcards.trained]
    inputs = {"pairs": entry["pairs"]}
    if entry.get("sheet"):
        inputs["sheet"] = entry["sheet"]
    base = entry["base"]
    if base in config["models"]:
        inputs["base"] = model_files(base)
    elif base.endswith(".json"):
        inputs["base"] = base
    return inputs
