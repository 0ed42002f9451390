"""Rules tile_shardNNNNN: each slide of a shard → results/tiles/{slide}.parquet + results/qc/{slide}.png +
results/qc/tissue/{slide}.png (its tissue mask), and the shard's rows of the cohort table →
results/qc/shards/{shard}.tsv."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.tiling.qc import write_cohort_table
from histoclip.tiling.shards import SlideToTile, tile_shard

with rule_log(snakemake.log[0], "histoclip.tile") as log:
    slides = [
        SlideToTile(
            slide_id, path, tiles, qc, {**snakemake.params.settings, **own}, snakemake.params.mpp_cells[slide_id], mask
        )
        for (slide_id, own), path, tiles, qc, mask in zip(
            snakemake.params.slides.items(),
            snakemake.input.slides,
            snakemake.output.tiles,
            snakemake.output.qc,
            snakemake.output.masks,
            strict=True,
        )
    ]
    report = tile_shard(slides, threads=snakemake.threads, stage_dir=snakemake.config["tiling"]["stage_dir"])
    write_cohort_table(snakemake.output.tiles, snakemake.output.table)
    log.info(
        "%d slides: %d tiled (%d tiles), %d reused, %d recorded as failed",
        len(slides),
        len(report.tiled),
        report.n_tiles,
        len(report.reused),
        len(report.recorded_failed),
    )
