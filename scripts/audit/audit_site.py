"""Rule audit_site: the site audit table (results/audit/{model}/site.tsv) and its figure."""

from pathlib import Path

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.audit.site import AuditSettings, SiteAuditInputs, plot_site_audit, run_site_audit
from histoclip.logs import rule_log
from histoclip.plots import FigureStyle, write_tsv

with rule_log(snakemake.log[0], "histoclip.audit") as log:
    given = snakemake.input
    inputs = SiteAuditInputs(
        given.sheet,
        given.slides,
        **{key: given.get(key) for key in ("clusters", "composition", "calls", "patients", "cox")},
    )
    table, facts = run_site_audit(
        inputs, AuditSettings.from_config(snakemake.params.settings), cox_penalizer=snakemake.params.penalizer
    )
    write_tsv(table, snakemake.output.table)
    plot_site_audit(
        table,
        facts,
        Path(snakemake.output.tsv).with_suffix(""),
        FigureStyle.from_config(snakemake.params.style),
        title=f"Site audit ({snakemake.wildcards.model}, {len(facts['sites'])} sites)",
    )
    for row in table[table["quantity"].isin(["balanced_accuracy", "adjusted_rand_index", "chi_square"])].itertuples():
        log.info(
            "%s %s: %.3f (reference %.3f, p = %.3g)", row.analysis, row.quantity, row.value, row.reference, row.p_value
        )
