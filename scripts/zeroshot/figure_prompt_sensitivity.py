"""Rule figure_prompt_sensitivity: prompt_sensitivity.tsv → distribution of balanced accuracy over subsets."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.plots import FigureStyle
from histoclip.zeroshot.sensitivity import plot_prompt_sensitivity, read_prompt_sensitivity

with rule_log(snakemake.log[0], "histoclip.figures") as log:
    style = FigureStyle.from_config(snakemake.params.style)
    summary, table = read_prompt_sensitivity(snakemake.input.json, snakemake.input.table)
    name = f"{snakemake.wildcards.model} / {snakemake.wildcards.promptset}"
    written = plot_prompt_sensitivity(
        table,
        snakemake.output.tsv.removesuffix(".tsv"),
        style,
        chance=1.0 / len(summary["classes"]),
        title=f"Prompt sensitivity: {name}, {summary['n_slides']} held-out slides",
    )
    log.info("wrote %s", ", ".join(map(str, written)))
