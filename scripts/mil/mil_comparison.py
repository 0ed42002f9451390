"""Rule mil_comparison: zero-shot vs few-shot vs MIL on the same held-out slides (table and figure)."""

from pathlib import Path

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)
import pandas as pd

from histoclip.formats import read_calls
from histoclip.logs import rule_log
from histoclip.mil.comparison import compare_methods, plot_comparison
from histoclip.plots import FigureStyle

with rule_log(snakemake.log[0], "histoclip.mil.comparison") as log:
    mil = {
        model: read_calls(path) for model, path in zip(snakemake.params.mil_models, snakemake.input.mil, strict=True)
    }
    fewshot = pd.read_csv(snakemake.input.fewshot, sep="\t")
    table, facts = compare_methods(read_calls(snakemake.input.zeroshot), fewshot, mil, seed=snakemake.params.seed)
    title = f"{snakemake.wildcards.task}: zero-shot vs few-shot vs MIL ({snakemake.wildcards.model})"
    plot_comparison(
        table,
        Path(snakemake.output.tsv).with_suffix(""),
        FigureStyle.from_config(snakemake.params.style),
        chance=facts["chance"],
        title=title,
    )
    for row in table.itertuples():
        log.info(
            "%s: balanced accuracy %.3f (%.3f-%.3f, %s), n = %d",
            row.name,
            row.balanced_accuracy,
            row.lower_95,
            row.upper_95,
            row.interval,
            row.n_slides,
        )
