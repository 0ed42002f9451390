# Slide tiling: mpp policy, tissue detection on a low-resolution level, tile grid, QC thumbnail.


rule tile:
    input:
        slide=slide_path,
    output:
        tiles="results/tiles/{slide}.parquet",
        qc="results/qc/{slide}.png",
    params:
        settings=tiling_settings,
    conda:
        "../envs/slides.yaml"
    log:
        "results/logs/tile/{slide}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/tile_slide.py"


rule cohort_qc:
    input:
        tiles=tile_files,
    output:
        table="results/qc/cohort.tsv",
    conda:
        "../envs/slides.yaml"
    log:
        "results/logs/cohort_qc.log",
    threads: 1
    script:
        "../scripts/cohort_qc.py"
