# Exports in the formats other tools read: QuPath GeoJSON per slide (tissue annotations, tile detections with
# scores and phenotypes), AnnData of the slides (and, on request, of each slide's tiles) for scanpy/squidpy, and
# CLAM/TRIDENT-layout HDF5 features per slide. The per-slide exports are one job per embedding shard, with
# constant output paths, like the evidence (docs/architecture.md, "Planning"); an index file per shard stands for
# its slides' files in the default target.


include: "functions/export.smk"


for _model, _shard, _slides in export_shard_rules():

    rule:
        name:
            rule_name("qupath", _model, _shard)
        input:
            # the shard's embedding manifest stands for its embedding files (and, older still, its tile files and
            # tissue masks, which the tiling shards write together: params, as in the evidence rules)
            embeddings=f"results/embeddings/{_model}/shards/{_shard}.tsv",
            **export_model_inputs(_model),
        output:
            index=f"results/qupath/{_model}/index/{_shard}.tsv",
            geojson=[f"results/qupath/{_model}/{slide}.geojson" for slide in _slides],
        params:
            model=_model,
            slides=_slides,
            prompt_sets=export_prompt_sets(_model),
            tiles=[f"results/tiles/{slide}.parquet" for slide in _slides],
            masks=[f"results/qc/tissue/{slide}.png" for slide in _slides],
        log:
            f"results/logs/qupath/{_model}/{_shard}.log",
        threads: 1
        conda:
            "../envs/export.yaml"
        script:
            "../scripts/export/qupath_shard.py"

    rule:
        name:
            rule_name("tile_anndata", _model, _shard)
        input:
            embeddings=f"results/embeddings/{_model}/shards/{_shard}.tsv",
            **export_model_inputs(_model),
        output:
            index=f"results/export/{_model}/tiles/index/{_shard}.tsv",
            h5ad=[f"results/export/{_model}/tiles/{slide}.h5ad" for slide in _slides],
        params:
            model=_model,
            slides=_slides,
            prompt_sets=export_prompt_sets(_model),
            tiles=[f"results/tiles/{slide}.parquet" for slide in _slides],
        log:
            f"results/logs/tile_anndata/{_model}/{_shard}.log",
        threads: 1
        conda:
            "../envs/export.yaml"
        script:
            "../scripts/export/tile_anndata_shard.py"

    rule:
        name:
            rule_name("mil_h5", _model, _shard)
        input:
            embeddings=f"results/embeddings/{_model}/shards/{_shard}.tsv",
        output:
            index=f"results/export/{_model}/h5/index/{_shard}.tsv",
            h5=[f"results/export/{_model}/h5/{slide}.h5" for slide in _slides],
        params:
            model=_model,
            slides=_slides,
            tiles=[f"results/tiles/{slide}.parquet" for slide in _slides],
        log:
            f"results/logs/mil_h5/{_model}/{_shard}.log",
        threads: 1
        conda:
            "../envs/export.yaml"
        script:
            "../scripts/export/mil_h5_shard.py"


rule slides_anndata:
    input:
        unpack(slides_anndata_inputs),
    output:
        h5ad="results/export/{model}/slides.h5ad",
    params:
        sheet=config["slides"],
        prompt_sets=lambda wildcards: export_prompt_sets(wildcards.model),
    log:
        "results/logs/export/{model}/slides_anndata.log",
    threads: 1
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/export/slides_anndata.py"


rule qupath:
    """Named target: every slide's QuPath GeoJSON, every model."""
    input:
        qupath_outputs,


rule anndata:
    """Named target: the slides' AnnData and every slide's tile AnnData (whatever export.tile_anndata says)."""
    input:
        slides_anndata_outputs,
        tile_anndata_outputs,


rule mil_h5:
    """Named target: every slide's CLAM/TRIDENT HDF5 features (whatever export.mil_h5 says)."""
    input:
        mil_h5_outputs,


rule exports:
    """Named target: every export, switches or not."""
    input:
        qupath_outputs,
        slides_anndata_outputs,
        tile_anndata_outputs,
        mil_h5_outputs,
