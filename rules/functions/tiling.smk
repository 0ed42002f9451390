# Input functions, settings and output lists of the tiling stage (rules/tiling.smk).
import functools


def tiling_settings():
    """Every setting that decides a slide's tile grid, but the slide's own (patient, sheet mpp): a change here
    re-tiles the cohort (params rerun trigger). tiling.shard_size and tiling.threads only decide how jobs are cut,
    tiling.stage_dir where slides are read from (the job script reads it from the config)."""
    return {
        "on_slide_error": config["on_slide_error"],
        "tiling": {k: v for k, v in config["tiling"].items() if k not in ("shard_size", "threads", "stage_dir")},
        "tissue": config["tissue"],
        "mpp": config["mpp"],
        "qc_thumbnail_px": config["qc"]["thumbnail_px"],
    }


def slide_tiling_settings(slide_ids):
    """{slide: what the sheet says that decides its tiles}: a change re-runs the slide's tiling shard."""
    records = cohort()
    return {slide: {"patient_id": records[slide].patient_id, "sheet_mpp": records[slide].mpp} for slide in slide_ids}


def tile_files(wildcards=None):
    return expand("results/tiles/{slide}.parquet", slide=slide_ids())


def tiling_shards():
    return cohort_shards(config["tiling"]["shard_size"])


def tiling_shard_tables(wildcards=None):
    """The tiling shards' tables (results/qc/shards/): together they stand for every tile file."""
    return expand("results/qc/shards/{shard}.tsv", shard=tiling_shards())


@functools.cache
def _tiling_shard_of():
    return {slide: shard for shard, ids in tiling_shards().items() for slide in ids}


def tiling_shard_tables_of(slides):
    """The tables of the tiling shards that tile ``slides`` (each once, in order)."""
    shard_of = _tiling_shard_of()
    return [f"results/qc/shards/{shard}.tsv" for shard in dict.fromkeys(shard_of[slide] for slide in slides)]
