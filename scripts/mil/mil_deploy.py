"""Rule mil_deploy: a saved MIL model (mil.deploy) calls this cohort; scored when the sheet has its labels."""

import json

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.mil.saved import model_path_info
from histoclip.mil.stage import deploy_cohort
from histoclip.store import write_text_atomic

with rule_log(snakemake.log[0], "histoclip.mil") as log:
    log.info("deploying %s", model_path_info(snakemake.input.model))
    evaluation = deploy_cohort(
        snakemake.input.model,
        snakemake.input.sheet,
        snakemake.input.embeddings,
        snakemake.output.calls,
        attention=snakemake.output.attention,
        device=snakemake.params.device,
        seed=snakemake.params.seed,
    )
    write_text_atomic(snakemake.output.evaluation, json.dumps(evaluation, indent=2, default=float) + "\n")
    if evaluation is not None:
        log.info("balanced accuracy on this cohort's labels: %.3f", evaluation["balanced_accuracy"])
