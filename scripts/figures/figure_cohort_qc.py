"""Rule figure_cohort_qc: results/qc/cohort.tsv → the cohort QC overview figure (+ its source data)."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.figures import cohort_qc_figure
from histoclip.formats import read_cohort_table
from histoclip.logs import rule_log
from histoclip.plots import FigureStyle, save_figure

with rule_log(snakemake.log[0], "histoclip.figures") as log:
    style = FigureStyle.from_config(snakemake.params.style)
    cohort = read_cohort_table(snakemake.input.cohort)
    figure, data = cohort_qc_figure(cohort, style)
    written = save_figure(figure, snakemake.output.tsv.removesuffix(".tsv"), style, data=data, title="Cohort QC")
    log.info("wrote %s", ", ".join(map(str, written)))
