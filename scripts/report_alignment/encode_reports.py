"""Rule encode_reports: the reports of the sheet's slides and the report-style class prompts, through the text tower."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.embedding.models import ModelSpec, load_model
from histoclip.logs import rule_log
from histoclip.report_alignment.calls import report_style_prompt_set
from histoclip.report_alignment.pipeline import encode
from histoclip.sheets import read_cohort_sheet
from histoclip.zeroshot.calls import write_text_classifier
from histoclip.zeroshot.prompts import load_prompt_set

with rule_log(snakemake.log[0], "histoclip.report_alignment") as log:
    params = snakemake.params
    spec = ModelSpec.from_config(snakemake.wildcards.model, params.model, params.search_dirs)
    model = load_model(spec, params.device)
    n = encode(model, snakemake.input.reports, read_cohort_sheet(params.sheet), params.max_chunk_chars,
               snakemake.output.reports)  # fmt: skip
    prompts = report_style_prompt_set(load_prompt_set(snakemake.input.prompts), params.templates)
    write_text_classifier(model, prompts, snakemake.output.classifier)
    log.info("%d reports embedded; report-style prompt set %s (%s)", n, prompts.name, prompts.sha256[:12])
