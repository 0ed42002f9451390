"""Rule figure_slide_map: the slides on their 2-D map, coloured by cluster, zero-shot call and label."""

import json
from pathlib import Path

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)
import pandas as pd

from histoclip.cohort.clustering import slide_map_figure
from histoclip.formats import read_calls
from histoclip.logs import rule_log
from histoclip.plots import FigureStyle, save_figure
from histoclip.sheets import read_cohort_sheet

with rule_log(snakemake.log[0], "histoclip.figures") as log:
    style = FigureStyle.from_config(snakemake.params.style)
    table = pd.read_csv(
        snakemake.input.clusters, sep="\t", dtype={"slide_id": str, "patient_id": str, "cluster": "Int64"}
    )
    summary = json.loads(Path(snakemake.input.summary).read_text(encoding="utf-8"))
    colourings = {"cluster": table["cluster"].tolist()}
    if hasattr(snakemake.input, "calls"):
        calls = read_calls(snakemake.input.calls)
        call = dict(zip(calls["slide_id"], calls["call"].replace("", "abstained"), strict=True))
        colourings["zero-shot call"] = [call.get(s) for s in table["slide_id"]]
    labels = {r.slide_id: r.label for r in read_cohort_sheet(snakemake.params.sheet)}
    if any(labels.values()):
        colourings["label"] = [labels.get(s) for s in table["slide_id"]]
    figure, data = slide_map_figure(table, colourings, style, summary["map"]["axes"])
    stem = snakemake.output.tsv.removesuffix(".tsv")
    title = f"Slide map ({summary['map']['method']}): {snakemake.wildcards.model}, k = {summary['k']}"
    log.info("wrote %s", ", ".join(map(str, save_figure(figure, stem, style, data=data, title=title))))
