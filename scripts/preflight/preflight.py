"""Rule check: the preflight table (results/preflight.tsv), one line per problem; fails when any is an error."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.preflight import describe, run_preflight, write_report

with rule_log(snakemake.log.log, "histoclip.preflight") as log:
    report = run_preflight(
        snakemake.params.config,
        search_dirs=snakemake.params.search_dirs,
        threads=snakemake.threads,
        results_dir=snakemake.params.results,
        source=snakemake.params.source,
    )
    write_report(report, snakemake.log.table, snakemake.log.slides)
    text = describe(report, snakemake.log.table)
    if not report.ok:
        log.error("%s", text)
        raise SystemExit(1)  # after the table is written: the job fails, the table (a log) stays
    log.info("%s", text)
