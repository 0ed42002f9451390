"""Rule train_alignment: the slide–report aligner, trained on the sheet's train split (CPU, deterministic)."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)
import torch

from histoclip.logs import rule_log
from histoclip.report_alignment.pipeline import train
from histoclip.report_alignment.training import AlignmentSettings
from histoclip.sheets import read_cohort_sheet

with rule_log(snakemake.log[0], "histoclip.report_alignment") as log:
    torch.set_num_threads(snakemake.threads)
    provenance = train(
        read_cohort_sheet(snakemake.params.sheet),
        snakemake.input.reports,
        snakemake.input.report_embeddings,
        snakemake.input.embeddings,
        AlignmentSettings.from_config(snakemake.params.settings),
        snakemake.output.weights,
        snakemake.output.history,
    )
    log.info("train slides %s; validation slides %s", provenance["train_slides"], provenance["validation_slides"])
