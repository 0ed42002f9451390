# Input functions, settings and output lists of the tiling stage (rules/tiling.smk).
import functools


def tiling_settings():
    """Every setting that decides a slide's tile grid, but the slide's own (patient, sheet mpp, regions of
    interest): a change here re-tiles the cohort (params rerun trigger). tiling.shard_size and tiling.threads only
    decide how jobs are cut, tiling.stage_dir where slides are read from (the job script reads it from the config);
    tiling.roi_classes is a setting of the slides that have an ROI file only."""
    return {
        "on_slide_error": config["on_slide_error"],
        "tiling": {
            k: v for k, v in config["tiling"].items() if k not in ("shard_size", "threads", "stage_dir", "roi_classes")
        },
        "tissue": config["tissue"],
        "mpp": config["mpp"],
        "qc_thumbnail_px": config["qc"]["thumbnail_px"],
    }


def slide_tiling_settings(slide_ids):
    """{slide: what the sheet says that decides its tiles}: a change re-runs the slide's tiling shard."""
    records = cohort()
    settings = {}
    for slide in slide_ids:
        record = records[slide]
        settings[slide] = {"patient_id": record.patient_id, "sheet_mpp": record.mpp}
        if record.roi is not None:
            settings[slide] |= {"roi": str(record.roi), "roi_classes": list(config["tiling"]["roi_classes"])}
    return settings


def slide_roi_files(slide_ids):
    """The ROI files of ``slide_ids`` that have one: inputs of their tiling shard (an edited file re-tiles)."""
    records = cohort()
    return [str(records[slide].roi) for slide in slide_ids if records[slide].roi is not None]


def slide_mpp_cells(slide_ids):
    """{slide: where its cell of the sheet's mpp column is, or "" without such a column}: for the message of a
    slide without mpp metadata only, so kept apart from the settings that decide its tiles."""
    records = cohort()
    return {slide: records[slide].mpp_cell for slide in slide_ids}


#: A slide's tile file. Rules whose outputs go into the HTML report take this pattern (and the sheet) as params
#: rather than the list of every slide's file: the report copies a job's params into each of its items, so a
#: per-slide list there would grow the report with the cohort (24 evidence figures x 2,000 paths).
TILE_FILE = "results/tiles/{slide}.parquet"


def tile_files(wildcards=None):
    return expand(TILE_FILE, slide=slide_ids())


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
