"""Rule fewshot: slide embeddings + zero-shot calls → few-shot balanced accuracy per k and draw, summary, figure."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.plots import FigureStyle, write_tsv
from histoclip.zeroshot.fewshot import FewShotSettings, plot_fewshot, run_fewshot

with rule_log(snakemake.log[0], "histoclip.zeroshot.fewshot") as log:
    settings = FewShotSettings.from_config(snakemake.params.settings)
    column = snakemake.params.settings["fewshot"]["embedding_column"]
    results, summary, facts = run_fewshot(
        snakemake.input.slides, snakemake.input.calls, settings, embedding_column=column
    )
    write_tsv(results, snakemake.output.results)
    write_tsv(summary, snakemake.output.summary)
    log.info(
        "classes %s, training pool %s, %d held-out slides; zero-shot balanced accuracy %.3f",
        facts["classes"],
        facts["n_pool"],
        facts["n_test"],
        facts["zeroshot_balanced_accuracy"],
    )
    for row in summary.itertuples():
        log.info(
            "%-9s k=%-3d median %.3f range [%.3f, %.3f] %s", row.method, row.k, row.median, row.min, row.max, row.note
        )
    style = FigureStyle.from_config(snakemake.params.style)
    name = f"{snakemake.wildcards.model} / {snakemake.wildcards.promptset}"
    plot_fewshot(
        summary,
        snakemake.output.tsv.removesuffix(".tsv"),
        style,
        chance=1.0 / len(facts["classes"]),
        title=f"Few-shot vs zero-shot ({column}): {name}, {facts['n_test']} held-out slides",
    )
