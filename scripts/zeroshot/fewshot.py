"""Rules fewshot and fewshot_labels: slide embeddings + zero-shot calls (or, for a model without a text tower, the
cohort sheet's labels) → few-shot balanced accuracy per k and draw, summary, figure."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.plots import FigureStyle, write_tsv
from histoclip.zeroshot.fewshot import FewShotSettings, plot_fewshot, run_fewshot

with rule_log(snakemake.log[0], "histoclip.zeroshot.fewshot") as log:
    settings = FewShotSettings.from_config(snakemake.params.settings)
    column = snakemake.params.settings["fewshot"]["embedding_column"]
    calls = snakemake.input.get("calls")
    results, summary, facts = run_fewshot(
        snakemake.input.slides, calls, settings, embedding_column=column, sheet=snakemake.params.get("sheet")
    )
    write_tsv(results, snakemake.output.results)
    write_tsv(summary, snakemake.output.summary)
    zeroshot = facts["zeroshot_balanced_accuracy"]
    log.info(
        "classes %s, training pool %s, %d held-out slides; %s",
        facts["classes"],
        facts["n_pool"],
        facts["n_test"],
        "no zero-shot (labels from the cohort sheet)"
        if zeroshot is None
        else f"zero-shot balanced accuracy {zeroshot:.3f}",
    )
    for row in summary.itertuples():
        log.info(
            "%-9s k=%-3d median %.3f range [%.3f, %.3f] %s", row.method, row.k, row.median, row.min, row.max, row.note
        )
    style = FigureStyle.from_config(snakemake.params.style)
    if calls is None:
        name, versus = f"{snakemake.wildcards.model} / sheet labels", ""
    else:
        name, versus = f"{snakemake.wildcards.model} / {snakemake.wildcards.promptset}", " vs zero-shot"
    plot_fewshot(
        summary,
        snakemake.output.tsv.removesuffix(".tsv"),
        style,
        chance=1.0 / len(facts["classes"]),
        title=f"Few-shot{versus} ({column}): {name}, {facts['n_test']} held-out slides",
    )
