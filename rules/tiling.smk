# Slide tiling: mpp policy, tissue detection on a low-resolution level, tile grid, QC thumbnail.
# One job per shard of `tiling.shard_size` slides (tiled `tiling.threads` at a time), each slide still written
# to its own tile file and thumbnail (histoclip.tiling.shards says why, and how a re-run resumes). As for the
# embedding shards, the rules are made from the sheet at parse time (ids only, no slide opened) with
# constant output paths (docs/architecture.md, "Planning").


include: "functions/tiling.smk"


for _shard, _slides in tiling_shards().items():

    rule:
        name:
            rule_name("tile", _shard)
        input:
            slides=slide_files(_slides),
            rois=slide_roi_files(_slides),
        output:
            # the shard's rows of results/qc/cohort.tsv: what the cohort-wide rules take as input for its tiles
            # (first: Snakemake looks through a rule's outputs in order when it asks which rule makes a file)
            table=f"results/qc/shards/{_shard}.tsv",
            tiles=[f"results/tiles/{slide}.parquet" for slide in _slides],
            qc=[f"results/qc/{slide}.png" for slide in _slides],
            # the tissue mask the tiles were measured on (1-bit PNG): the QuPath export draws tissue from it
            masks=[f"results/qc/tissue/{slide}.png" for slide in _slides],
        params:
            slides=slide_tiling_settings(_slides),
            settings=tiling_settings(),
            mpp_cells=slide_mpp_cells(_slides),
        log:
            f"results/logs/tile/{_shard}.log",
        threads: min(config["tiling"]["threads"], len(_slides))
        resources:
            mem_mb=lambda wildcards, threads, attempt: 2000 * threads * attempt,
            runtime=shard_runtime(len(_slides), minutes_per_slide=10),
        conda:
            "../envs/slides.yaml"
        script:
            "../scripts/tiling/tile_shard.py"


rule cohort_qc:
    """Every slide's tiling in one table (the shards' tables, in sheet order); it stands for every tile file."""
    input:
        shards=tiling_shard_tables,
    output:
        table="results/qc/cohort.tsv",
    conda:
        "../envs/slides.yaml"
    log:
        "results/logs/cohort_qc.log",
    threads: 1
    script:
        "../scripts/tiling/cohort_qc.py"
