"""Rule survival_multimodal: clinical vs image vs combined Cox models by cross-validated c-index, and the figure."""

from pathlib import Path

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.plots import FigureStyle, write_tsv
from histoclip.sheets import read_cohort_sheet
from histoclip.survival.multimodal import MultimodalSettings, plot_multimodal, run_multimodal
from histoclip.survival.plan import SurvivalPlan

with rule_log(snakemake.log[0], "histoclip.survival.multimodal") as log:
    plan = SurvivalPlan.from_config(snakemake.params.settings)
    table = run_multimodal(
        snakemake.input.clinical,
        {r.slide_id: r.patient_id for r in read_cohort_sheet(snakemake.input.sheet, check_files=False)},
        snakemake.input.slides,
        plan,
        MultimodalSettings.from_config(snakemake.params.settings),
    )
    write_tsv(table, snakemake.output.table)
    plot_multimodal(
        table,
        Path(snakemake.output.tsv).with_suffix(""),
        FigureStyle.from_config(snakemake.params.style),
        title=f"Image + clinical survival ({snakemake.wildcards.model})",
    )
    for row in table.itertuples():
        log.info(
            "%s, %s: cross-validated c-index %.3f (%.3f-%.3f) over %s folds %s",
            row.endpoint,
            row.model,
            row.c_index,
            row.c_index_lower_95,
            row.c_index_upper_95,
            row.valid_folds,
            row.note,
        )
