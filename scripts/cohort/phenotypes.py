"""Rule phenotypes: tile embeddings + text classifiers → phenotype centroids, per-tile assignments, compositions."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.cohort.phenotypes import PhenotypeSettings, run_phenotypes
from histoclip.formats import embedding_paths, read_text_classifier
from histoclip.logs import rule_log
from histoclip.sheets import read_cohort_sheet

with rule_log(snakemake.log[0], "histoclip.cohort.phenotypes") as log:
    records = {r.slide_id: r for r in read_cohort_sheet(snakemake.params.sheet)}
    slides = list(records)
    classifiers = {
        name: read_text_classifier(path)
        for name, path in zip(snakemake.params.prompt_sets, snakemake.input.classifiers, strict=True)
    }
    result = run_phenotypes(
        slides,
        [records[s].patient_id for s in slides],
        embedding_paths(snakemake.input.embeddings, slides),
        snakemake.output.assignments.rsplit("/", 1)[0],
        PhenotypeSettings.from_config(snakemake.params.settings),
        classifiers,
        threads=snakemake.threads,
    )
    for row in result.phenotypes.itertuples():
        log.info(
            "%s: %d tiles (%.1f %%) %s",
            row.phenotype,
            row.n_tiles,
            100 * row.fraction,
            f"nearest class {row.nearest_class} ({row.similarity:.3f})" if classifiers else "",
        )
