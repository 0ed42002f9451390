"""Rule cohort_qc: every slide's tile-file metadata → results/qc/cohort.tsv."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.qc import write_cohort_table

with rule_log(snakemake.log[0], "histoclip.cohort_qc") as log:
    table = write_cohort_table(snakemake.input.tiles, snakemake.output.table)
    failed = table[table["status"] != "ok"]
    log.info("%d slides, %d failed, %d tiles", len(table), len(failed), int(table["n_tiles"].sum()))
    for row in failed.itertuples():
        log.warning("slide %s failed: %s", row.slide_id, row.error)
