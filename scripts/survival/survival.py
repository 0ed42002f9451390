"""Rule survival: clinical table + slide outputs → patient table, Cox models, c-index, Kaplan–Meier tables."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.sheets import read_cohort_sheet
from histoclip.survival.analysis import SurvivalInputs, run_survival, write_survival
from histoclip.survival.plan import SurvivalPlan

with rule_log(snakemake.log[0], "histoclip.survival.analysis") as log:
    params = snakemake.params
    plan = SurvivalPlan.from_config(params.settings)
    inputs = SurvivalInputs(
        clinical=snakemake.input.clinical,
        slide_patients={r.slide_id: r.patient_id for r in read_cohort_sheet(snakemake.input.sheet)},
        **{source: snakemake.input.get(source) for source in ("calls", "composition", "class_composition", "clusters")},
    )
    result = run_survival(inputs, plan)
    write_survival(
        result,
        patients=snakemake.output.patients,
        univariable=snakemake.output.univariable,
        multivariable=snakemake.output.multivariable,
        cindex=snakemake.output.cindex,
        km=dict(zip(plan.groupings, snakemake.output.km, strict=True)),
        logrank=dict(zip(plan.groupings, snakemake.output.logrank, strict=True)),
    )
    for row in result.cindex.itertuples():
        if row.note and row.c_index != row.c_index:  # NaN: not computed, and the note says why
            log.info("%s, %s: %s", row.endpoint, row.model, row.note)
            continue
        log.info(
            "%s, %s: cross-validated c-index %.3f (%.3f-%.3f), apparent %.3f",
            row.endpoint,
            row.model,
            row.c_index,
            row.c_index_lower_95,
            row.c_index_upper_95,
            row.apparent_c_index,
        )
