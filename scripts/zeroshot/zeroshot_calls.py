"""Rule zeroshot: embeddings + text classifier → tile scores, calls.tsv and (with labels) the evaluation."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.formats import embedding_paths, read_text_classifier
from histoclip.logs import rule_log
from histoclip.sheets import read_cohort_sheet
from histoclip.zeroshot.calls import CallSettings, call_cohort

with rule_log(snakemake.log[0], "histoclip.zeroshot.classifier") as log:
    records = {r.slide_id: r for r in read_cohort_sheet(snakemake.params.sheet)}
    calls = call_cohort(
        [records[slide] for slide in snakemake.params.slides],
        embedding_paths(snakemake.input.embeddings, snakemake.params.slides),
        read_text_classifier(snakemake.input.classifier),
        snakemake.output.tile_scores.rsplit("/", 1)[0],
        CallSettings.from_config(snakemake.params.settings),
    )
    readable = calls["status"] == "ok"  # a failed slide or one without tiles is not an abstention: it was never called
    log.info(
        "%d slides called, %d abstained (margin below zeroshot.abstain_margin), %d not called: %s",
        int((calls["call"] != "").sum()),
        int((calls["abstain"] & readable).sum()),
        int((~readable).sum()),
        ", ".join(f"{n} {status}" for status, n in calls.loc[~readable, "status"].value_counts().items()) or "none",
    )
