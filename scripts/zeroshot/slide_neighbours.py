"""Rule slide_neighbours: each slide's most similar slides by cosine of slide embeddings, and precision@k."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.sheets import read_cohort_sheet
from histoclip.zeroshot.retrieval import SlideVectors, precision_at_k, slide_neighbours, write_neighbour_outputs

with rule_log(snakemake.log[0], "histoclip.zeroshot.retrieval") as log:
    settings = snakemake.params.settings
    records = {r.slide_id: r for r in read_cohort_sheet(snakemake.params.sheet)}
    # Slide embeddings of the aggregation step (mean of each slide's tile embeddings, renormalised).
    vectors = SlideVectors.from_slide_table(snakemake.input.slides, list(records))
    patients = {sid: records[sid].patient_id for sid in vectors.slide_ids}
    k = settings["neighbours"]
    table = slide_neighbours(
        vectors.slide_ids,
        vectors.vectors,
        k,
        patient_ids=[patients[sid] for sid in vectors.slide_ids] if settings["exclude_same_patient"] else None,
    )
    labels = {sid: records[sid].label for sid in vectors.slide_ids}
    # Queries: labelled slides not used to train the model (sheet column split != train); the archive searched
    # is the whole cohort, training slides included, as a case archive would be.
    queries = [
        sid for sid in vectors.slide_ids
        if labels[sid] and str(records[sid].extra.get("split", "")).lower() != "train"
    ]  # fmt: skip
    summary = {
        "k": k,
        "exclude_same_patient": settings["exclude_same_patient"],
        "slide_embedding": "mean of the slide's L2-normalised tile embeddings, renormalised",
        "queries": "slides with a label, not in split 'train'; neighbours from the whole cohort",
        "slides_without_embedding": vectors.skipped,
    }
    if any(labels.values()):
        summary |= precision_at_k(
            table,
            labels,
            [kk for kk in (1, 3, 5, 10, k) if kk <= k],
            queries=queries,
            patient_ids=patients if settings["exclude_same_patient"] else None,
        )
        log.info("precision@k %s (chance %s) over %d query slides", summary["precision_at_k"], summary["chance"],
                 summary["n_queries"])  # fmt: skip
    else:
        summary["note"] = "the cohort sheet has no label column: no precision@k"
    write_neighbour_outputs(table, summary, snakemake.output.table, snakemake.output.summary)
    log.info("%d slides, %d neighbour rows", len(vectors.slide_ids), len(table))
