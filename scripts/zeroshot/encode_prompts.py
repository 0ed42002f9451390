"""Rule encode_prompts: a prompt set → the text classifier of one model (per-class weights + prompts hash)."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.embedding.models import ModelSpec, load_model
from histoclip.logs import rule_log
from histoclip.zeroshot.calls import write_text_classifier
from histoclip.zeroshot.prompts import load_prompt_set

with rule_log(snakemake.log[0], "histoclip.encode_prompts") as log:
    prompt_set = load_prompt_set(snakemake.input.prompts)
    spec = ModelSpec.from_config(snakemake.wildcards.model, snakemake.params.model, snakemake.params.search_dirs)
    model = load_model(spec, snakemake.params.device)
    classifier = write_text_classifier(model, prompt_set, snakemake.output.classifier)
    log.info(
        "prompt set %s (sha256 %s): %d classes, logit scale %.2f",
        prompt_set.name,
        prompt_set.sha256[:12],
        len(classifier.classes),
        classifier.logit_scale,
    )
