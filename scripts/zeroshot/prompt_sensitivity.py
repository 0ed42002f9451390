"""Rule prompt_sensitivity: one model load, every prompt encoded once → balanced accuracy over prompt subsets."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.embedding.models import ModelSpec, load_model
from histoclip.formats import embedding_paths, read_text_classifier
from histoclip.logs import rule_log
from histoclip.zeroshot.prompts import load_prompt_set
from histoclip.zeroshot.sensitivity import (
    PromptCache,
    SensitivitySettings,
    cohort_prompt_sensitivity,
    write_prompt_sensitivity,
)

with rule_log(snakemake.log[0], "histoclip.zeroshot.sensitivity") as log:
    prompt_set = load_prompt_set(snakemake.input.prompts)
    spec = ModelSpec.from_config(snakemake.wildcards.model, snakemake.params.model, snakemake.params.search_dirs)
    model = load_model(spec, snakemake.params.device)
    stored = read_text_classifier(snakemake.input.classifier)
    slides = list(snakemake.params.slides)
    summary, table = cohort_prompt_sensitivity(
        prompt_set,
        PromptCache(model.encode_texts),
        model.logit_scale,
        model.weights_sha256,
        snakemake.input.calls,
        dict(zip(slides, embedding_paths(snakemake.input.embeddings, slides), strict=True)),
        (stored.classes, stored.weights),
        SensitivitySettings.from_config(snakemake.params.settings),
    )
    summary["model_name"] = model.spec.name
    write_prompt_sensitivity(summary, table, snakemake.output.json, snakemake.output.table)
    log.info(
        "%d subsets on %d held-out slides: balanced accuracy median %s (IQR %s, range %s to %s); full set %s "
        "(zero-shot rule: %s); %d prompts encoded",
        summary["n_subsets"],
        summary["n_slides"],
        summary["median"],
        summary["iqr"],
        summary["min"],
        summary["max"],
        summary["full"],
        summary["calls_balanced_accuracy"],
        summary["n_prompts_encoded"],
    )
