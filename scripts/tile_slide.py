"""Rule tile: one slide → results/tiles/{slide}.parquet + results/qc/{slide}.png."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.tiling import run_tiling_from_settings

with rule_log(snakemake.log[0], "histoclip.tile") as log:
    meta = run_tiling_from_settings(
        snakemake.input.slide,
        snakemake.wildcards.slide,
        snakemake.output.tiles,
        snakemake.output.qc,
        snakemake.params.settings,
    )
    log.info("slide %s: status %s, %s tiles", meta["slide_id"], meta["status"], meta["n_tiles"])
