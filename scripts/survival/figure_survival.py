"""Rule figure_survival: Cox tables and Kaplan–Meier tables → forest plot and one KM figure per grouping."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)
import pandas as pd

from histoclip.logs import rule_log
from histoclip.plots import FigureStyle, class_colours, save_figure
from histoclip.survival.plots import forest_figure, km_figure


def read(path):
    return pd.read_csv(path, sep="\t", dtype={"group": str, "covariate": str, "endpoint": str})


with rule_log(snakemake.log[0], "histoclip.figures") as log:
    style = FigureStyle.from_config(snakemake.params.style)
    model = snakemake.wildcards.model
    figure, data = forest_figure(read(snakemake.input.univariable), read(snakemake.input.multivariable), style)
    stem = snakemake.output["forest_tsv"].removesuffix(".tsv")
    log.info("wrote %s", ", ".join(map(str, save_figure(figure, stem, style, data=data, title=f"Cox: {model}"))))
    for name, km, logrank in zip(snakemake.params.names, snakemake.input.km, snakemake.input.logrank, strict=True):
        curves, tests = read(km), read(logrank)
        # Groups keep one colour per level across endpoints and figures; subtypes take the zero-shot figures'
        # class colours (every class of the prompt set, in its order, whether or not a patient was called it).
        levels = str(tests["levels"].iloc[0]).split("; ") if len(tests) else list(dict.fromkeys(curves["group"]))
        figure, data = km_figure(
            curves, tests, style, time_unit=snakemake.params.time_unit, colours=class_colours(levels)
        )
        stem = snakemake.output[f"km_{name}_tsv"].removesuffix(".tsv")
        log.info("wrote %s", ", ".join(map(str, save_figure(figure, stem, style, data=data, title=f"KM: {model}"))))
