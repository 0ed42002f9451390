"""Rules embed_<model>_<shard>: the shard's tile files → results/embeddings/{model}/{slide}.parquet (one model load),
and the shard's lines of the embedding manifest → results/embeddings/{model}/shards/{shard}.tsv."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.embedding.devices import assign_gpu
from histoclip.embedding.embed import SlideJob, embed_shard
from histoclip.embedding.models import ModelSpec, load_model
from histoclip.formats import write_embedding_manifest
from histoclip.logs import rule_log

with rule_log(snakemake.log[0], "histoclip.embed") as log:
    settings = snakemake.params.embedding
    # first, before CUDA starts: this job's own GPU when concurrent jobs share several (held until the job ends)
    gpu = assign_gpu(settings["device"], snakemake.config["embedding"]["devices"])
    spec = ModelSpec.from_config(snakemake.params.model_name, snakemake.params.model, snakemake.params.search_dirs)
    model = load_model(spec, settings["device"])
    log.info("model %s loaded: %s", spec.name, model.provenance())
    outputs = snakemake.output.embeddings
    jobs = [SlideJob.from_tile_file(t, o) for t, o in zip(snakemake.params.tiles, outputs, strict=True)]
    report = embed_shard(
        jobs,
        model,
        batch_size=spec.batch_size or settings["batch_size"],
        num_workers=settings["num_workers"],
        cpus=snakemake.threads,
        dtype=settings["dtype"],
        row_group_rows=settings["row_group_rows"],
        on_slide_error=snakemake.config["on_slide_error"],
        stage_dir=snakemake.config["embedding"]["stage_dir"],
    )
    write_embedding_manifest(snakemake.output.manifest, [job.slide_id for job in jobs], outputs)
    log.info(
        "shard done: %d computed, %d reused, %d failed, %d tiles in %.1f s",
        len(report.computed),
        len(report.reused),
        len(report.failed),
        report.tiles,
        report.seconds,
    )
