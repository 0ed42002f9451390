"""Rule cohort_qc: the tiling shards' tables → results/qc/cohort.tsv (one row per slide, in sheet order)."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.formats import read_cohort_table
from histoclip.logs import rule_log
from histoclip.store import concat_tsv_atomic

with rule_log(snakemake.log[0], "histoclip.cohort_qc") as log:
    concat_tsv_atomic(snakemake.input.shards, snakemake.output.table)
    table = read_cohort_table(snakemake.output.table)
    failed = table[table["status"] != "ok"]
    log.info("%d slides, %d failed, %d tiles", len(table), len(failed), int(table["n_tiles"].sum()))
    for row in failed.itertuples():
        log.warning("slide %s failed: %s", row.slide_id, row.error)
